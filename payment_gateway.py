"""The payment provider behind a small interface, and its Stripe implementation through the real
`stripe` SDK (async methods). Real Stripe when STRIPE_SECRET_KEY is a real key; the local
emulator (simulators/stripe_emulator.py) when STRIPE_API_BASE points at it.

Every call that creates or moves money carries an idempotency key derived from one of our ids,
so a retried request (ours or the SDK's) has no second effect at the provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import stripe


class StripeHTTPXClient(stripe.HTTPXClient):
    """stripe.HTTPXClient passing the form body as `content=`: stripe 16.1 passes it as
    `data=<str>`, which httpx 0.28 answers with a DeprecationWarning on every POST (an error under
    this project's pytest settings). Use it wherever the SDK's async methods run; with
    allow_sync_methods=True it serves sync calls too. Close it with close() / close_async()."""

    def _get_request_args_kwargs(self, method, url, headers, post_data):
        args, kwargs = super()._get_request_args_kwargs(method, url, headers, post_data)
        body = kwargs.pop("data", None)
        if body:
            kwargs["content"] = body
        return args, kwargs


@dataclass(frozen=True)
class ProviderIntent:
    """What we read from the provider about one intent (amounts in minor units, currency upper)."""

    id: str
    status: str
    amount_minor: int
    amount_received_minor: int
    currency: str
    customer: str | None = None
    payment_method: str | None = None
    client_secret: str | None = None
    failure_code: str | None = None
    setup_future_usage: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def observation(self, intent_id: str) -> dict[str, Any]:
        """The Wallet actor's ApplyIntentStatus payload for this snapshot."""
        saved = self.payment_method if self.setup_future_usage and self.status == "succeeded" else None
        return {
            "intent_id": intent_id,
            "provider_intent_id": self.id,
            "provider_status": self.status,
            "amount_received_minor": self.amount_received_minor,
            "currency": self.currency,
            "failure_code": self.failure_code,
            "customer": self.customer,
            "saved_payment_method": saved,
        }


@dataclass(frozen=True)
class ProviderRefund:
    """What we read from the provider about one refund, whoever started it (us, or someone in
    the provider's dashboard). `metadata.refund_id` is our Refund id when we started it."""

    id: str
    payment_intent: str | None
    amount_minor: int
    currency: str
    status: str
    metadata: dict[str, str] = field(default_factory=dict)
    failure_reason: str | None = None


def refund_from_stripe(obj: Any) -> ProviderRefund:
    obj = plain(obj)
    intent = obj.get("payment_intent")
    return ProviderRefund(
        id=obj["id"],
        payment_intent=intent if isinstance(intent, str) else (intent or {}).get("id"),
        amount_minor=int(obj["amount"]),
        currency=str(obj["currency"]).upper(),
        status=str(obj.get("status") or "pending"),
        metadata=dict(obj.get("metadata") or {}),
        failure_reason=obj.get("failure_reason"),
    )


class PaymentDeclined(Exception):
    """The card was declined; `intent` is the provider intent after the attempt (still open)."""

    def __init__(self, code: str, intent: ProviderIntent | None) -> None:
        super().__init__(code)
        self.code = code
        self.intent = intent


class GatewayError(Exception):
    """The provider refused the request or could not be reached; `code` is its error code."""

    def __init__(self, code: str, message: str = "", status: int | None = None) -> None:
        super().__init__(message or code)
        self.code = code
        self.status = status


class PaymentGateway(Protocol):
    code: str

    async def get_or_create_customer(self, user_id: str, existing_id: str | None) -> str: ...
    async def create_intent(self, *, amount_minor: int, currency: str, customer: str | None,
                            idempotency_key: str, metadata: dict[str, str], save_card: bool = False,
                            payment_method: str | None = None, off_session: bool = False) -> ProviderIntent: ...
    async def confirm(self, provider_intent_id: str, payment_method: str, idempotency_key: str) -> ProviderIntent: ...
    async def authorize(self, *, amount_minor: int, currency: str, customer: str, payment_method: str,
                        idempotency_key: str, metadata: dict[str, str]) -> ProviderIntent: ...
    async def capture(self, provider_intent_id: str, amount_minor: int, idempotency_key: str) -> ProviderIntent: ...
    async def retrieve(self, provider_intent_id: str) -> ProviderIntent: ...
    async def cancel(self, provider_intent_id: str, idempotency_key: str) -> ProviderIntent: ...
    async def refund(self, provider_intent_id: str, amount_minor: int, idempotency_key: str,
                     metadata: dict[str, str] | None = None) -> str: ...
    async def recent_intents(self, since: datetime) -> list[ProviderIntent]: ...
    async def refunds_of(self, provider_intent_id: str) -> list[ProviderRefund]: ...
    async def recent_refunds(self, since: datetime) -> list[ProviderRefund]: ...
    async def close(self) -> None: ...


def plain(obj: Any) -> Any:
    """A StripeObject (which refuses dict methods) as plain dicts and lists."""
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


def intent_from_stripe(obj: Any) -> ProviderIntent:
    """Our snapshot of a Stripe PaymentIntent (an SDK object or the JSON of a webhook)."""
    obj = plain(obj)
    error = obj.get("last_payment_error") or {}
    method = obj.get("payment_method")
    return ProviderIntent(
        id=obj["id"],
        status=obj["status"],
        amount_minor=int(obj["amount"]),
        amount_received_minor=int(obj.get("amount_received") or 0),
        currency=str(obj["currency"]).upper(),
        customer=obj.get("customer") if isinstance(obj.get("customer"), str) else None,
        payment_method=method if isinstance(method, str) else (method or {}).get("id"),
        client_secret=obj.get("client_secret"),
        failure_code=error.get("decline_code") or error.get("code"),
        setup_future_usage=obj.get("setup_future_usage"),
        metadata=dict(obj.get("metadata") or {}),
    )


class StripeGateway:
    """The gateway through `stripe.StripeClient`. `api_base` points the SDK at the emulator."""

    code = "stripe"

    def __init__(self, secret_key: str, api_base: str | None = None, max_network_retries: int = 2) -> None:
        self._http = StripeHTTPXClient()
        bases = {"api": api_base} if api_base else {}
        self.client = stripe.StripeClient(
            secret_key, base_addresses=bases, http_client=self._http, max_network_retries=max_network_retries
        )

    async def close(self) -> None:
        await self._http.close_async()

    async def get_or_create_customer(self, user_id: str, existing_id: str | None) -> str:
        if existing_id:
            return existing_id
        customer = await self._call(self.client.v1.customers.create_async(
            params={"metadata": {"user_id": user_id}}, options={"idempotency_key": f"customer:{user_id}"},
        ))
        return plain(customer)["id"]

    async def create_intent(self, *, amount_minor, currency, customer, idempotency_key, metadata,
                            save_card=False, payment_method=None, off_session=False) -> ProviderIntent:
        params: dict[str, Any] = {
            "amount": amount_minor, "currency": currency.lower(), "metadata": metadata,
            "payment_method_types": ["card"],
        }
        if customer:
            params["customer"] = customer
        if save_card and customer:
            params["setup_future_usage"] = "off_session"
        if payment_method:
            params.update(payment_method=payment_method, confirm=True)
        if off_session:
            params["off_session"] = True
        return await self._intent_call(self.client.v1.payment_intents.create_async(
            params=params, options={"idempotency_key": idempotency_key}
        ))

    async def confirm(self, provider_intent_id, payment_method, idempotency_key) -> ProviderIntent:
        return await self._intent_call(self.client.v1.payment_intents.confirm_async(
            provider_intent_id, params={"payment_method": payment_method}, options={"idempotency_key": idempotency_key},
        ))

    async def authorize(self, *, amount_minor, currency, customer, payment_method, idempotency_key, metadata) -> ProviderIntent:
        """A manual-capture hold on a saved card, off-session (a rental paid by card)."""
        return await self._intent_call(self.client.v1.payment_intents.create_async(
            params={"amount": amount_minor, "currency": currency.lower(), "customer": customer,
                    "payment_method": payment_method, "payment_method_types": ["card"], "capture_method": "manual",
                    "confirm": True, "off_session": True, "metadata": metadata},
            options={"idempotency_key": idempotency_key},
        ))

    async def capture(self, provider_intent_id, amount_minor, idempotency_key) -> ProviderIntent:
        return await self._intent_call(self.client.v1.payment_intents.capture_async(
            provider_intent_id, params={"amount_to_capture": amount_minor}, options={"idempotency_key": idempotency_key},
        ))

    async def retrieve(self, provider_intent_id) -> ProviderIntent:
        return await self._intent_call(self.client.v1.payment_intents.retrieve_async(provider_intent_id))

    async def cancel(self, provider_intent_id, idempotency_key) -> ProviderIntent:
        return await self._intent_call(self.client.v1.payment_intents.cancel_async(
            provider_intent_id, options={"idempotency_key": idempotency_key}
        ))

    async def refund(self, provider_intent_id, amount_minor, idempotency_key, metadata=None) -> str:
        params: dict[str, Any] = {"payment_intent": provider_intent_id, "amount": amount_minor}
        if metadata:
            params["metadata"] = metadata
        refund = await self._call(self.client.v1.refunds.create_async(
            params=params, options={"idempotency_key": idempotency_key},
        ))
        return plain(refund)["id"]

    async def refunds_of(self, provider_intent_id) -> list[ProviderRefund]:
        return await self._refunds({"payment_intent": provider_intent_id, "limit": 100})

    async def recent_refunds(self, since: datetime) -> list[ProviderRefund]:
        return await self._refunds({"created": {"gte": int(since.timestamp())}, "limit": 100})

    async def _refunds(self, params: dict[str, Any]) -> list[ProviderRefund]:
        page = await self._call(self.client.v1.refunds.list_async(params=params))
        found = []
        async for obj in page.auto_paging_iter():
            found.append(refund_from_stripe(obj))
        return found

    async def recent_intents(self, since: datetime) -> list[ProviderIntent]:
        page = await self._call(self.client.v1.payment_intents.list_async(
            params={"created": {"gte": int(since.timestamp())}, "limit": 100}
        ))
        found = []
        async for obj in page.auto_paging_iter():
            found.append(intent_from_stripe(obj))
        return found

    async def _intent_call(self, pending) -> ProviderIntent:
        try:
            return intent_from_stripe(await pending)
        except stripe.CardError as error:
            body = (error.error.payment_intent if error.error else None) or None
            raise PaymentDeclined(
                (error.error.decline_code or error.code) if error.error else (error.code or "card_declined"),
                intent_from_stripe(body) if body else None,
            ) from None
        except stripe.StripeError as error:
            raise GatewayError(error.code or type(error).__name__, str(error.user_message or error), error.http_status) from None

    async def _call(self, pending):
        try:
            return await pending
        except stripe.StripeError as error:
            raise GatewayError(error.code or type(error).__name__, str(error.user_message or error), error.http_status) from None

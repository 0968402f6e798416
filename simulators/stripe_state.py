"""The state machine behind the Stripe emulator (stripe_emulator.py): pure, no I/O.

`StripeState.handle(method, path, params)` answers one Stripe API v1 request the way Stripe
would for the subset the backend uses (customers, payment methods with Stripe's test tokens,
payment intents, charges, refunds, events) and returns `(http_status, body)`. Every state change
appends an Event; the server takes new events with `take_new_events()` and delivers them as
webhooks. The clock and the random source are injected so tests are reproducible.

Objects are kept as the JSON dicts Stripe returns (with `"object": "payment_intent"` and so on),
so the real `stripe` SDK builds its own classes from them; bookkeeping Stripe does not expose
(which card a payment method behaves like, whether a one-off payment method was used) lives
beside them. Money is integers in minor units, as in Stripe.

Simplifications are deliberate and listed in docs/payments.md; the notable one: releasing an
uncaptured amount (cancel, partial capture) is not reported as a refund on the charge.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
import string
import time
from dataclasses import dataclass
from typing import Any, Callable

API_VERSION = "2026-10-28.endive"  # what the stripe SDK 16 pins; sent back as Stripe-Version
MAX_AMOUNT = 99_999_999  # Stripe's cap: eight digits in minor units
MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 10

# Stripe's presentment currencies, lowercase ISO 4217.
CURRENCIES = frozenset(
    """usd aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bif bmd bnd bob brl bsd bwp byn
    bzd cad cdf chf clp cny cop crc cve czk djf dkk dop dzd egp etb eur fjd fkp gbp gel gip gmd gnf
    gtq gyd hkd hnl htg huf idr ils inr isk jmd jpy kes kgs khr kmf krw kyd kzt lak lbp lkr lrd lsl
    mad mdl mga mkd mmk mnt mop mur mvr mwk mxn myr mzn nad ngn nio nok npr nzd pab pen pgk php pkr
    pln pyg qar ron rsd rub rwf sar sbd scr sek sgd shp sle sos srd std szl thb tjs top try ttd twd
    tzs uah ugx uyu uzs vnd vuv wst xaf xcd xof xpf yer zar zmw""".split()
)
ZERO_DECIMAL_CURRENCIES = frozenset("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split())
# Stripe's published minimum charge amounts (minor units); other currencies have a minimum worth
# USD 0.50 at the day's rate, which an emulator cannot know, so none is enforced for them.
MINIMUM_AMOUNTS = {
    "usd": 50, "aed": 200, "aud": 50, "bgn": 100, "brl": 50, "cad": 50, "chf": 50, "czk": 1500,
    "dkk": 250, "eur": 50, "gbp": 30, "hkd": 400, "huf": 17500, "inr": 50, "jpy": 50, "mxn": 1000,
    "myr": 200, "nok": 300, "nzd": 50, "pln": 200, "ron": 200, "sek": 300, "sgd": 50, "thb": 1000,
}

PI_CANCELABLE = ("requires_payment_method", "requires_capture", "requires_confirmation", "requires_action")
PI_UPDATABLE = ("requires_payment_method", "requires_confirmation", "requires_action")
CANCELLATION_REASONS = ("duplicate", "fraudulent", "requested_by_customer", "abandoned")
REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")
CAPTURE_METHODS = ("automatic", "automatic_async", "manual")
FUTURE_USAGES = ("on_session", "off_session")


@dataclass(frozen=True)
class Decline:
    code: str
    decline_code: str
    message: str


GENERIC_DECLINE = Decline("card_declined", "generic_decline", "Your card was declined.")
AUTHENTICATION_DECLINE = Decline(
    "authentication_required", "authentication_required", "Your card was declined. This transaction requires authentication."
)


@dataclass(frozen=True)
class CardBehaviour:
    """How one of Stripe's test cards behaves. `decline` refuses charges and attaching;
    `charge_decline` attaches fine and refuses charges (pm_card_chargeCustomerFail);
    `authentication` asks for 3D Secure on session and is declined off session."""

    brand: str
    last4: str
    decline: Decline | None = None
    charge_decline: Decline | None = None
    authentication: bool = False


_INSUFFICIENT = Decline("card_declined", "insufficient_funds", "Your card has insufficient funds.")
TEST_CARDS: dict[str, CardBehaviour] = {
    "visa": CardBehaviour("visa", "4242"),
    "visa_debit": CardBehaviour("visa", "5556"),
    "mastercard": CardBehaviour("mastercard", "4444"),
    "amex": CardBehaviour("amex", "8431"),
    "chargeDeclined": CardBehaviour("visa", "0002", decline=GENERIC_DECLINE),
    "chargeDeclinedInsufficientFunds": CardBehaviour("visa", "9995", decline=_INSUFFICIENT),
    "visa_chargeDeclinedInsufficientFunds": CardBehaviour("visa", "9995", decline=_INSUFFICIENT),
    "insufficientFunds": CardBehaviour("visa", "9995", decline=_INSUFFICIENT),
    "chargeDeclinedFraudulent": CardBehaviour("visa", "0019", decline=Decline("card_declined", "fraudulent", "Your card was declined.")),
    "chargeDeclinedExpiredCard": CardBehaviour("visa", "0069", decline=Decline("expired_card", "expired_card", "Your card has expired.")),
    "chargeDeclinedIncorrectCvc": CardBehaviour(
        "visa", "0127", decline=Decline("incorrect_cvc", "incorrect_cvc", "Your card's security code is incorrect.")
    ),
    "chargeCustomerFail": CardBehaviour("visa", "0341", charge_decline=GENERIC_DECLINE),
    "authenticationRequired": CardBehaviour("visa", "3184", authentication=True),
    "threeDSecure2Required": CardBehaviour("visa", "3155", authentication=True),
}


class StripeError(Exception):
    """An error answer in Stripe's shape. 400/404 become the SDK's InvalidRequestError (or
    IdempotencyError by type), 401 AuthenticationError, 402 CardError."""

    def __init__(self, http_status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.extra = extra

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param is not None:
            error["param"] = self.param
        error.update(self.extra)
        return {"error": error}


def invalid(message: str, *, param: str | None = None, code: str | None = None, **extra: Any) -> StripeError:
    return StripeError(400, message, param=param, code=code, **extra)


def missing(kind: str, object_id: str, *, param: str = "id", http_status: int = 404) -> StripeError:
    return StripeError(http_status, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


# --- parameter parsing: the SDK sends every value as a string -----------------------------

_INTEGER = re.compile(r"-?\d+")


def only(params: dict[str, Any], allowed: set[str]) -> None:
    """Refuse unknown parameters as Stripe does, so a typo in the backend fails in tests
    instead of being silently ignored. Parameters real Stripe knows but the emulator does not
    model are refused too, saying so."""
    for name in params:
        if name not in allowed and name != "expand":
            raise invalid(f"Received unknown parameter: {name} (the emulator does not model it)",
                          param=name, code="parameter_unknown")


def integer(params: dict[str, Any], name: str, *, required: bool = False, minimum: int | None = None,
            maximum: int | None = None) -> int | None:
    raw = params.get(name)
    if raw is None:
        if required:
            raise invalid(f"Missing required param: {name}.", param=name, code="parameter_missing")
        return None
    if not isinstance(raw, str) or not _INTEGER.fullmatch(raw):
        raise invalid(f"Invalid integer: {raw}", param=name, code="parameter_invalid_integer")
    value = int(raw)
    if minimum is not None and value < minimum:
        raise invalid(f"This value must be greater than or equal to {minimum}.", param=name, code="parameter_invalid_integer")
    if maximum is not None and value > maximum:
        raise invalid(f"This value must be less than or equal to {maximum}.", param=name, code="parameter_invalid_integer")
    return value


def boolean(params: dict[str, Any], name: str) -> bool | None:
    raw = params.get(name)
    if raw is None:
        return None
    if raw not in ("true", "false"):
        raise invalid(f"Invalid boolean: {raw}", param=name, code="parameter_invalid_boolean")
    return raw == "true"


def text(params: dict[str, Any], name: str, *, required: bool = False, choices: tuple[str, ...] | None = None) -> str | None:
    raw = params.get(name)
    if raw is None:
        if required:
            raise invalid(f"Missing required param: {name}.", param=name, code="parameter_missing")
        return None
    if not isinstance(raw, str):
        raise invalid(f"Invalid string: {raw!r}", param=name, code="parameter_invalid_string")
    if choices is not None and raw not in choices:
        raise invalid(f"Invalid {name}: must be one of {', '.join(choices)}", param=name, code="parameter_invalid_string")
    return raw


def currency(params: dict[str, Any], *, required: bool = True) -> str | None:
    raw = text(params, "currency", required=required)
    if raw is None:
        return None
    if raw.lower() not in CURRENCIES:
        raise invalid(f"Invalid currency: {raw.lower()}. Stripe currently supports these currencies: "
                      + ", ".join(sorted(CURRENCIES)), param="currency")
    return raw.lower()


def array(params: dict[str, Any], name: str) -> list[str]:
    """`expand[]=a`, `expand[0]=a&expand[1]=b` (what the SDK sends) or a single value."""
    raw = params.get(name)
    if raw is None:
        return []
    if isinstance(raw, list):
        return raw
    if isinstance(raw, dict) and all(key.isdigit() for key in raw):
        return [raw[key] for key in sorted(raw, key=int)]
    if isinstance(raw, str):
        return [raw]
    raise invalid(f"Invalid array: {name}", param=name, code="parameter_invalid_array")


def metadata_update(current: dict[str, str], params: dict[str, Any]) -> dict[str, str]:
    """Stripe merges metadata on update; an empty string deletes a key, `metadata=` clears all."""
    raw = params.get("metadata")
    if raw is None:
        return current
    if raw == "":
        return {}
    if not isinstance(raw, dict):
        raise invalid("Invalid metadata: must be a hash of string keys to string values", param="metadata")
    merged = dict(current)
    for key, value in raw.items():
        if not isinstance(value, str):
            raise invalid(f"Invalid metadata[{key}]: values are strings", param=f"metadata[{key}]")
        if len(key) > 40:
            raise invalid("Metadata keys can be at most 40 characters", param=f"metadata[{key}]")
        if len(value) > 500:
            raise invalid("Metadata values can be at most 500 characters", param=f"metadata[{key}]")
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    if len(merged) > 50:
        raise invalid("You can have at most 50 metadata keys", param="metadata")
    return merged


def check_amount(amount: int, currency_code: str, *, enforce_minimum: bool, param: str = "amount") -> None:
    if amount > MAX_AMOUNT:
        raise invalid(f"Amount must be no more than {format_amount(MAX_AMOUNT, currency_code)}", param=param, code="amount_too_large")
    minimum = MINIMUM_AMOUNTS.get(currency_code) if enforce_minimum else None
    if minimum is not None and amount < minimum:
        raise invalid(f"Amount must be at least {format_amount(minimum, currency_code)}", param=param, code="amount_too_small")


def format_amount(amount: int, currency_code: str) -> str:
    if currency_code in ZERO_DECIMAL_CURRENCIES:
        return f"{amount:,} {currency_code}"
    return f"{amount // 100:,}.{amount % 100:02d} {currency_code}"


def created_filter(params: dict[str, Any], name: str = "created") -> Callable[[int], bool]:
    """`created=N` or `created[gt|gte|lt|lte]=N`."""
    raw = params.get(name)
    if raw is None:
        return lambda _created: True
    if isinstance(raw, str):
        exact = integer(params, name)
        return lambda created: created == exact
    if not isinstance(raw, dict) or not set(raw) <= {"gt", "gte", "lt", "lte"}:
        raise invalid(f"Invalid {name}: use {name}[gt], [gte], [lt] or [lte]", param=name)
    bounds = {op: integer(raw, op) for op in raw}
    checks = {"gt": lambda c, b: c > b, "gte": lambda c, b: c >= b, "lt": lambda c, b: c < b, "lte": lambda c, b: c <= b}
    return lambda created: all(checks[op](created, bound) for op, bound in bounds.items())


EXPANDABLE = frozenset({"customer", "payment_method", "latest_charge", "charge", "payment_intent",
                        "invoice_settings.default_payment_method"})


def expandable(paths: list[str]) -> list[str]:
    """The `expand[]` paths the emulator can follow (`customer`, `data.latest_charge`, ...)."""
    for path in paths:
        if not isinstance(path, str) or path.removeprefix("data.") not in EXPANDABLE:
            raise invalid(f"This property cannot be expanded ({path}).", param="expand")
    return paths


def params_fingerprint(params: dict[str, Any]) -> str:
    """Equal for the same parameters in any order: what an idempotency key is bound to."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


# --- the state ----------------------------------------------------------------------------

OBJECT_KINDS = {"cus": "customer", "pm": "payment_method", "pi": "payment_intent", "ch": "charge", "re": "refund", "evt": "event"}


class StripeState:
    """All objects of one emulated Stripe account. Not thread-safe on its own: the server
    serializes calls with a lock, which is cheap because nothing here waits."""

    def __init__(self, *, seed: int | None = None, now_s: Callable[[], float] = time.time,
                 processing: bool = False, enforce_minimum_amount: bool = True) -> None:
        self._random = random.Random(seed)
        self._now_s = now_s
        self.processing = processing  # confirmations pass through `processing` until settle()
        self.enforce_minimum_amount = enforce_minimum_amount
        self.objects: dict[str, dict[str, Any]] = {}
        self.order: dict[str, list[str]] = {kind: [] for kind in OBJECT_KINDS.values()}
        self._cards: dict[str, CardBehaviour] = {}  # payment method id -> behaviour
        self._spent: set[str] = set()  # one-off payment methods already used for a payment
        self._authenticated: set[str] = set()  # intents whose 3D Secure step was completed
        self._new_events: list[dict[str, Any]] = []
        self.request: dict[str, Any] | None = None  # the API request being handled, for events

    # ids, time, storage ---------------------------------------------------------------------

    def new_id(self, prefix: str) -> str:
        alphabet = string.ascii_letters + string.digits
        return f"{prefix}_" + "".join(self._random.choice(alphabet) for _ in range(24))

    def now(self) -> int:
        return int(self._now_s())

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.objects[obj["id"]] = obj
        self.order[obj["object"]].append(obj["id"])
        return obj

    def get(self, kind: str, object_id: str, *, param: str = "id", http_status: int = 404) -> dict[str, Any]:
        obj = self.objects.get(object_id)
        if obj is None or obj["object"] != kind or obj.get("deleted"):
            raise missing(kind, object_id, param=param, http_status=http_status)
        return obj

    def emit(self, event_type: str, obj: dict[str, Any]) -> dict[str, Any]:
        event = {
            "id": self.new_id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": self.now(),
            "data": {"object": copy.deepcopy(obj)},
            "livemode": False,
            "pending_webhooks": 0,
            "request": copy.deepcopy(self.request) if self.request else {"id": None, "idempotency_key": None},
            "type": event_type,
        }
        self._store(event)
        self._new_events.append(event)
        return event

    def take_new_events(self) -> list[dict[str, Any]]:
        """Events created since the last call, oldest first: what the webhook sender delivers."""
        events, self._new_events = self._new_events, []
        return events

    # dispatch -------------------------------------------------------------------------------

    def handle(self, method: str, path: str, params: dict[str, Any], *,
               request: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """One API request -> (HTTP status, JSON body). Errors are answers, not exceptions."""
        self.request = request
        try:
            for route_method, pattern, operation in ROUTES:
                match = pattern.fullmatch(path)
                if match and route_method == method:
                    expand = expandable(array(params, "expand"))  # refused before anything changes
                    body = operation(self, params, *match.groups())
                    return 200, self.expand(copy.deepcopy(body), expand)
            raise StripeError(404, f"Unrecognized request URL ({method}: {path}). The emulator serves only the "
                                   "Stripe API subset listed in docs/payments.md.")
        except StripeError as error:
            return error.http_status, error.body()
        finally:
            self.request = None

    def expand(self, body: dict[str, Any], paths: list[str]) -> dict[str, Any]:
        """Replace an id by its object for each `expand[]` path (`customer`, `data.latest_charge`)."""
        for path in paths:
            targets = [body]
            *parents, leaf = path.split(".")
            for part in parents:
                targets = [item for t in targets for item in (t.get(part) if part == "data" and isinstance(t.get(part), list)
                                                              else [t.get(part)]) if isinstance(item, dict)]
            for target in targets:
                value = target.get(leaf)
                if isinstance(value, str) and value in self.objects:
                    target[leaf] = copy.deepcopy(self.objects[value])
        return body

    def list_of(self, kind: str, params: dict[str, Any], url: str, keep: Callable[[dict[str, Any]], bool] = lambda _o: True,
                extra: set[str] = frozenset()) -> dict[str, Any]:
        """Newest first, cursor pagination by `starting_after` / `ending_before` like Stripe."""
        only(params, {"limit", "starting_after", "ending_before", "created", *extra})
        limit = integer(params, "limit", minimum=1, maximum=MAX_LIST_LIMIT) or DEFAULT_LIST_LIMIT
        in_range = created_filter(params)
        items = [self.objects[i] for i in reversed(self.order[kind])]
        items = [o for o in items if not o.get("deleted") and in_range(o["created"]) and keep(o)]
        after, before = text(params, "starting_after"), text(params, "ending_before")
        if after is not None:
            self.get(kind, after, param="starting_after", http_status=400)
            index = next((n for n, o in enumerate(items) if o["id"] == after), len(items))
            items = items[index + 1:]
            page, has_more = items[:limit], len(items) > limit
        elif before is not None:
            self.get(kind, before, param="ending_before", http_status=400)
            index = next((n for n, o in enumerate(items) if o["id"] == before), 0)
            items = items[:index]
            page, has_more = items[-limit:], len(items) > limit
        else:
            page, has_more = items[:limit], len(items) > limit
        return {"object": "list", "data": page, "has_more": has_more, "url": url}

    # customers ------------------------------------------------------------------------------

    CUSTOMER_FIELDS = {"email", "name", "phone", "description"}

    def create_customer(self, params: dict[str, Any]) -> dict[str, Any]:
        only(params, {*self.CUSTOMER_FIELDS, "metadata", "payment_method", "invoice_settings"})
        customer = {
            "id": self.new_id("cus"), "object": "customer", "created": self.now(), "livemode": False,
            "description": None, "email": None, "name": None, "phone": None, "metadata": {},
            "invoice_settings": {"default_payment_method": None},
        }
        method_id = text(params, "payment_method")
        method = self.resolve_payment_method(method_id) if method_id is not None else None
        if method is not None:
            self._check_attachable(method, customer, param="payment_method")
        customer = self._with_customer_fields(customer, params)
        self._store(customer)
        self.emit("customer.created", customer)
        if method is not None:
            self._attach(method["id"], customer, param="payment_method")
        return customer

    def _with_customer_fields(self, customer: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """The customer as `params` would change it; a copy, so a refused update writes nothing."""
        customer = copy.deepcopy(customer)
        for name in self.CUSTOMER_FIELDS:
            value = text(params, name)
            if value is not None:
                customer[name] = value or None
        customer["metadata"] = metadata_update(customer["metadata"], params)
        settings = params.get("invoice_settings")
        if settings is not None:
            if not isinstance(settings, dict) or not set(settings) <= {"default_payment_method"}:
                raise invalid("Only invoice_settings[default_payment_method] is emulated", param="invoice_settings")
            default = text(settings, "default_payment_method")
            if default:
                method = self.get("payment_method", default, param="invoice_settings[default_payment_method]", http_status=400)
                if method["customer"] != customer["id"]:
                    raise invalid(f"The PaymentMethod {default} is not attached to customer {customer['id']}.",
                                  param="invoice_settings[default_payment_method]", code="payment_method_unexpected_state")
            customer["invoice_settings"]["default_payment_method"] = default or None
        return customer

    def retrieve_customer(self, params: dict[str, Any], customer_id: str) -> dict[str, Any]:
        only(params, set())
        return self.get("customer", customer_id)

    def update_customer(self, params: dict[str, Any], customer_id: str) -> dict[str, Any]:
        only(params, {*self.CUSTOMER_FIELDS, "metadata", "invoice_settings"})
        customer = self.get("customer", customer_id)
        customer.update(self._with_customer_fields(customer, params))
        self.emit("customer.updated", customer)
        return customer

    def delete_customer(self, params: dict[str, Any], customer_id: str) -> dict[str, Any]:
        only(params, set())
        customer = self.get("customer", customer_id)
        customer["deleted"] = True
        for method_id in self.order["payment_method"]:
            if self.objects[method_id]["customer"] == customer_id:
                self.objects[method_id]["customer"] = None
        self.emit("customer.deleted", {k: v for k, v in customer.items() if k != "deleted"})
        return {"id": customer_id, "object": "customer", "deleted": True}

    def list_customers(self, params: dict[str, Any]) -> dict[str, Any]:
        email = text(params, "email")
        return self.list_of("customer", params, "/v1/customers", lambda c: email is None or c["email"] == email, {"email"})

    # payment methods ------------------------------------------------------------------------

    def resolve_payment_method(self, method_id: str, *, param: str = "payment_method") -> dict[str, Any]:
        """A test token (`pm_card_visa`, `tok_visa`) makes a fresh payment method each time it
        is used, as in Stripe; any other id must exist."""
        for prefix in ("pm_card_", "tok_"):
            if method_id.startswith(prefix) and method_id[len(prefix):] in TEST_CARDS:
                return self._new_payment_method(TEST_CARDS[method_id[len(prefix):]])
        return self.get("payment_method", method_id, param=param, http_status=400)

    def _new_payment_method(self, card: CardBehaviour, metadata: dict[str, str] | None = None) -> dict[str, Any]:
        method = self._store({
            "id": self.new_id("pm"), "object": "payment_method", "type": "card", "created": self.now(),
            "customer": None, "livemode": False, "metadata": metadata or {},
            "billing_details": {"address": None, "email": None, "name": None, "phone": None},
            "card": {"brand": card.brand, "last4": card.last4, "exp_month": 12, "exp_year": 2034, "funding": "credit",
                     "country": "US", "fingerprint": hashlib.sha256(card.last4.encode()).hexdigest()[:16]},
        })
        self._cards[method["id"]] = card
        return method

    def create_payment_method(self, params: dict[str, Any]) -> dict[str, Any]:
        only(params, {"type", "card", "metadata"})
        text(params, "type", required=True, choices=("card",))
        card = params.get("card")
        token = card.get("token") if isinstance(card, dict) else None
        if not isinstance(token, str) or not token.startswith("tok_") or token[4:] not in TEST_CARDS:
            raise invalid("The emulator creates card payment methods from test tokens only: card[token]=tok_visa, "
                          "tok_chargeDeclined, ...", param="card[token]")
        return self._new_payment_method(TEST_CARDS[token[4:]], metadata_update({}, params))

    def retrieve_payment_method(self, params: dict[str, Any], method_id: str) -> dict[str, Any]:
        only(params, set())
        return self.get("payment_method", method_id)

    def attach_payment_method(self, params: dict[str, Any], method_id: str) -> dict[str, Any]:
        only(params, {"customer"})
        customer = self.get("customer", text(params, "customer", required=True), param="customer", http_status=400)
        return self._attach(method_id, customer, param="id")

    def _attach(self, method_id: str, customer: dict[str, Any], *, param: str) -> dict[str, Any]:
        method = self.resolve_payment_method(method_id, param=param)
        if method["customer"] == customer["id"]:
            return method
        self._check_attachable(method, customer, param=param)
        method["customer"] = customer["id"]
        self.emit("payment_method.attached", method)
        return method

    def _check_attachable(self, method: dict[str, Any], customer: dict[str, Any], *, param: str) -> None:
        """Stripe checks the card when it is attached, so a declining test card is refused here
        (pm_card_chargeCustomerFail is the one that attaches and declines later)."""
        if method["customer"] not in (None, customer["id"]):
            raise invalid(f"The payment method {method['id']} is already attached to another customer.",
                          param=param, code="payment_method_unexpected_state")
        if method["id"] in self._spent:
            raise invalid(f"The PaymentMethod {method['id']} was previously used without being attached to a Customer "
                          "or was detached from a Customer, and may not be used again.",
                          param=param, code="payment_method_unexpected_state")
        decline = self._cards[method["id"]].decline
        if decline is not None:
            raise StripeError(402, decline.message, type="card_error", code=decline.code, decline_code=decline.decline_code)

    def detach_payment_method(self, params: dict[str, Any], method_id: str) -> dict[str, Any]:
        only(params, set())
        method = self.get("payment_method", method_id)
        if method["customer"] is None:
            raise invalid(f"The payment method {method_id} is not attached to a customer so detachment is impossible.",
                          code="payment_method_unexpected_state")
        customer = self.objects[method["customer"]]
        if customer["invoice_settings"]["default_payment_method"] == method_id:
            customer["invoice_settings"]["default_payment_method"] = None
        method["customer"] = None
        self._spent.add(method_id)  # a detached payment method cannot be used again
        self.emit("payment_method.detached", method)
        return method

    def list_payment_methods(self, params: dict[str, Any], customer_id: str | None = None) -> dict[str, Any]:
        if customer_id is None:
            customer_id = text(params, "customer", required=True)
            url = "/v1/payment_methods"
        else:
            url = f"/v1/customers/{customer_id}/payment_methods"
        self.get("customer", customer_id, param="customer", http_status=400 if url == "/v1/payment_methods" else 404)
        kind = text(params, "type")
        return self.list_of("payment_method", params, url,
                            lambda m: m["customer"] == customer_id and kind in (None, m["type"]), {"customer", "type"})

    # payment intents ------------------------------------------------------------------------

    INTENT_CREATE = {"amount", "currency", "customer", "payment_method", "payment_method_types", "confirm", "capture_method",
                     "off_session", "metadata", "setup_future_usage", "description", "receipt_email", "statement_descriptor",
                     "statement_descriptor_suffix", "automatic_payment_methods", "return_url", "error_on_requires_action",
                     "confirmation_method", "use_stripe_sdk"}

    def create_payment_intent(self, params: dict[str, Any]) -> dict[str, Any]:
        only(params, self.INTENT_CREATE)
        code = currency(params)
        amount = integer(params, "amount", required=True, minimum=1)
        check_amount(amount, code, enforce_minimum=self.enforce_minimum_amount)
        confirm = boolean(params, "confirm") or False
        off_session = self._off_session(params)
        if off_session and not confirm:
            raise invalid("off_session can only be used when confirm is true.", param="off_session")
        if params.get("return_url") is not None and not confirm:
            raise invalid("return_url can only be used when confirm is true.", param="return_url")
        text(params, "confirmation_method", choices=("automatic",))
        self._card_only(params)
        customer_id = text(params, "customer")
        if customer_id is not None:
            self.get("customer", customer_id, param="customer", http_status=400)
        intent_id = self.new_id("pi")
        intent = {
            "id": intent_id, "object": "payment_intent", "amount": amount, "amount_capturable": 0, "amount_received": 0,
            "canceled_at": None, "cancellation_reason": None,
            # automatic_async is Stripe's default since API version 2024-06-20
            "capture_method": text(params, "capture_method", choices=CAPTURE_METHODS) or "automatic_async",
            "client_secret": f"{intent_id}_secret_{self.new_id('x')[2:]}", "confirmation_method": "automatic",
            "created": self.now(), "currency": code, "customer": customer_id, "description": text(params, "description"),
            "last_payment_error": None, "latest_charge": None, "livemode": False, "metadata": metadata_update({}, params),
            "next_action": None, "payment_method": None, "payment_method_types": ["card"], "processing": None,
            "receipt_email": text(params, "receipt_email"),
            "setup_future_usage": text(params, "setup_future_usage", choices=FUTURE_USAGES),
            "statement_descriptor": text(params, "statement_descriptor"),
            "statement_descriptor_suffix": text(params, "statement_descriptor_suffix"),
            "status": "requires_payment_method",
        }
        error_on_requires_action = boolean(params, "error_on_requires_action")
        self._set_payment_method(intent, params)
        if confirm:
            self._check_confirmable(intent)
        self._store(intent)
        self.emit("payment_intent.created", intent)
        if confirm:
            self._confirm(intent, off_session=off_session, error_on_requires_action=error_on_requires_action)
        return intent

    def _set_payment_method(self, intent: dict[str, Any], params: dict[str, Any]) -> None:
        """A new payment method (checked against the intent's customer) makes the intent wait
        for confirmation."""
        method_id = text(params, "payment_method")
        if method_id is None:
            return
        method = self.resolve_payment_method(method_id)
        self._check_ownership(intent, method)
        intent["payment_method"] = method["id"]
        intent["status"] = "requires_confirmation"

    def _off_session(self, params: dict[str, Any]) -> bool:
        raw = params.get("off_session")
        if raw in ("one_off", "recurring"):
            return True
        return boolean(params, "off_session") or False

    def _card_only(self, params: dict[str, Any]) -> None:
        types = array(params, "payment_method_types")
        if types and types != ["card"]:
            raise invalid("The emulator supports payment_method_types=['card'] only.", param="payment_method_types")

    def retrieve_payment_intent(self, params: dict[str, Any], intent_id: str) -> dict[str, Any]:
        only(params, {"client_secret"})
        return self.get("payment_intent", intent_id, param="intent")

    def update_payment_intent(self, params: dict[str, Any], intent_id: str) -> dict[str, Any]:
        only(params, {"amount", "currency", "customer", "payment_method", "metadata", "description", "receipt_email",
                      "setup_future_usage", "capture_method", "statement_descriptor", "statement_descriptor_suffix"})
        intent = self.get("payment_intent", intent_id, param="intent")
        if intent["status"] not in PI_UPDATABLE and set(params) - {"metadata", "description", "expand"}:
            raise self._unexpected_state(intent, "update", PI_UPDATABLE)
        updated = copy.deepcopy(intent)  # validate everything on a copy, then commit at once
        updated["currency"] = currency(params, required=False) or intent["currency"]
        amount = integer(params, "amount", minimum=1)
        updated["amount"] = intent["amount"] if amount is None else amount
        check_amount(updated["amount"], updated["currency"], enforce_minimum=self.enforce_minimum_amount)
        customer_id = text(params, "customer")
        if customer_id is not None:
            self.get("customer", customer_id, param="customer", http_status=400)
            updated["customer"] = customer_id
        updated["metadata"] = metadata_update(intent["metadata"], params)
        updated["capture_method"] = text(params, "capture_method", choices=CAPTURE_METHODS) or intent["capture_method"]
        for name in ("description", "receipt_email", "statement_descriptor", "statement_descriptor_suffix"):
            if params.get(name) is not None:
                updated[name] = text(params, name) or None
        if params.get("setup_future_usage") is not None:
            updated["setup_future_usage"] = text(params, "setup_future_usage", choices=FUTURE_USAGES)
        self._set_payment_method(updated, params)
        intent.update(updated)
        return intent

    def confirm_payment_intent(self, params: dict[str, Any], intent_id: str) -> dict[str, Any]:
        only(params, {"payment_method", "off_session", "return_url", "setup_future_usage", "error_on_requires_action",
                      "use_stripe_sdk", "receipt_email", "capture_method", "payment_method_types"})
        intent = self.get("payment_intent", intent_id, param="intent")
        if intent["status"] not in PI_UPDATABLE:
            if intent["status"] == "succeeded":
                raise invalid("You cannot confirm this PaymentIntent because it has already succeeded after being "
                              "previously confirmed.", code="payment_intent_unexpected_state",
                              payment_intent=copy.deepcopy(intent))
            raise self._unexpected_state(intent, "confirm", PI_UPDATABLE)
        self._card_only(params)
        off_session = self._off_session(params)
        error_on_requires_action = boolean(params, "error_on_requires_action")
        updated = copy.deepcopy(intent)
        if params.get("setup_future_usage") is not None:
            updated["setup_future_usage"] = text(params, "setup_future_usage", choices=FUTURE_USAGES)
        updated["capture_method"] = text(params, "capture_method", choices=CAPTURE_METHODS) or intent["capture_method"]
        self._set_payment_method(updated, params)
        self._check_confirmable(updated)
        intent.update(updated)
        self._confirm(intent, off_session=off_session, error_on_requires_action=error_on_requires_action)
        return intent

    def _confirm(self, intent: dict[str, Any], *, off_session: bool, error_on_requires_action: bool | None) -> None:
        """The heart of a payment: needs a usable payment method, then authenticates,
        declines, or authorizes, exactly as the test card says."""
        self._check_confirmable(intent)
        method = self.objects[intent["payment_method"]]
        card = self._cards[method["id"]]
        intent.update(last_payment_error=None, next_action=None)
        decline = card.decline or card.charge_decline
        if decline is not None:
            return self._decline(intent, method, decline, charge=True)
        if card.authentication and intent["id"] not in self._authenticated:
            if off_session or error_on_requires_action:
                return self._decline(intent, method, AUTHENTICATION_DECLINE, charge=False)
            intent["status"] = "requires_action"
            intent["next_action"] = {"type": "use_stripe_sdk", "use_stripe_sdk": {
                "type": "three_d_secure_redirect", "stripe_js": f"emulator://3ds/{intent['id']}"}}
            self.emit("payment_intent.requires_action", intent)
            return None
        self._authorize(intent, method)
        return None

    def _check_confirmable(self, intent: dict[str, Any]) -> None:
        """Checked before anything changes, so a refused confirmation writes nothing."""
        if intent["payment_method"] is None:
            raise invalid("You cannot confirm this PaymentIntent because it's missing a payment method. Update the "
                          "PaymentIntent with a payment_method and then confirm it again.",
                          param="payment_method", code="payment_intent_unexpected_state")
        self._check_ownership(intent, self.objects[intent["payment_method"]])  # it may have been detached since

    def _check_ownership(self, intent: dict[str, Any], method: dict[str, Any]) -> None:
        if method["customer"] is not None and method["customer"] != intent["customer"]:
            raise invalid(f"The provided PaymentMethod {method['id']} is attached to customer {method['customer']}; "
                          "a PaymentIntent may use it only with that customer.",
                          param="payment_method", code="payment_method_unexpected_state")
        if method["customer"] is None and method["id"] in self._spent:
            raise invalid(f"The PaymentMethod {method['id']} was previously used without being attached to a Customer "
                          "or was detached from a Customer, and may not be used again.",
                          param="payment_method", code="payment_method_unexpected_state")

    def _new_charge(self, intent: dict[str, Any], method: dict[str, Any], status: str) -> dict[str, Any]:
        charge = self._store({
            "id": self.new_id("ch"), "object": "charge", "amount": intent["amount"], "amount_captured": 0,
            "amount_refunded": 0, "captured": False, "created": self.now(), "currency": intent["currency"],
            "customer": intent["customer"], "description": intent["description"], "failure_code": None,
            "failure_message": None, "livemode": False, "metadata": dict(intent["metadata"]), "paid": status == "succeeded",
            "payment_intent": intent["id"], "payment_method": method["id"],
            "payment_method_details": {"type": "card", "card": {k: method["card"][k] for k in ("brand", "last4", "exp_month", "exp_year", "funding", "country")}},
            "refunded": False, "status": status,
        })
        intent["latest_charge"] = charge["id"]
        return charge

    def _decline(self, intent: dict[str, Any], method: dict[str, Any], decline: Decline, *, charge: bool) -> None:
        """A decline leaves the intent waiting for another payment method, records why, and
        answers 402 with the intent inside the error as Stripe does."""
        failed = None
        if charge:
            failed = self._new_charge(intent, method, "failed")
            failed.update(failure_code=decline.code, failure_message=decline.message,
                          outcome={"type": "issuer_declined", "network_status": "declined_by_network"})
            self.emit("charge.failed", failed)
        error = {"type": "card_error", "code": decline.code, "decline_code": decline.decline_code,
                 "message": decline.message, "payment_method": copy.deepcopy(method)}
        if failed is not None:
            error["charge"] = failed["id"]
        intent.update(status="requires_payment_method", last_payment_error=error, next_action=None)
        if method["customer"] is None:
            self._spent.add(method["id"])
        self.emit("payment_intent.payment_failed", intent)
        extra: dict[str, Any] = {"decline_code": decline.decline_code, "payment_intent": copy.deepcopy(intent),
                                 "payment_method": copy.deepcopy(method)}
        if failed is not None:
            extra["charge"] = failed["id"]
        raise StripeError(402, decline.message, type="card_error", code=decline.code, **extra)

    def _authorize(self, intent: dict[str, Any], method: dict[str, Any]) -> None:
        if intent["setup_future_usage"] and intent["customer"] and method["customer"] is None:
            self._attach(method["id"], self.objects[intent["customer"]], param="payment_method")
        elif method["customer"] is None:
            self._spent.add(method["id"])
        charge = self._new_charge(intent, method, "pending" if self.processing else "succeeded")
        if self.processing:
            intent["status"] = "processing"
            self.emit("payment_intent.processing", intent)
            return
        self._settle(intent, charge)

    def _settle(self, intent: dict[str, Any], charge: dict[str, Any]) -> None:
        charge.update(status="succeeded", paid=True, outcome={"type": "authorized", "network_status": "approved_by_network"})
        if intent["capture_method"] == "manual":
            intent.update(status="requires_capture", amount_capturable=intent["amount"])
            self.emit("charge.succeeded", charge)
            self.emit("payment_intent.amount_capturable_updated", intent)
        else:
            charge.update(captured=True, amount_captured=intent["amount"])
            intent.update(status="succeeded", amount_received=intent["amount"])
            self.emit("charge.succeeded", charge)
            self.emit("payment_intent.succeeded", intent)

    def settle(self, intent_id: str) -> dict[str, Any]:
        """Test helper: a `processing` intent finishes (the bank answered)."""
        intent = self.get("payment_intent", intent_id, param="intent")
        if intent["status"] != "processing":
            raise self._unexpected_state(intent, "settle", ("processing",))
        self._settle(intent, self.objects[intent["latest_charge"]])
        return intent

    def complete_action(self, intent_id: str, *, succeed: bool = True) -> dict[str, Any]:
        """Test helper: the customer finishes (or fails) 3D Secure for an intent in
        `requires_action`; as with automatic confirmation, the intent then proceeds by itself."""
        intent = self.get("payment_intent", intent_id, param="intent")
        if intent["status"] != "requires_action":
            raise self._unexpected_state(intent, "complete the action of", ("requires_action",))
        method = self.objects[intent["payment_method"]]
        if succeed:
            self._authenticated.add(intent_id)
            intent["next_action"] = None
            self._authorize(intent, method)
        else:
            intent.update(status="requires_payment_method", next_action=None, last_payment_error={
                "type": "invalid_request_error", "code": "payment_intent_authentication_failure",
                "message": "The provided PaymentMethod has failed authentication.", "payment_method": copy.deepcopy(method)})
            self.emit("payment_intent.payment_failed", intent)
        return intent

    def capture_payment_intent(self, params: dict[str, Any], intent_id: str) -> dict[str, Any]:
        only(params, {"amount_to_capture", "metadata", "statement_descriptor", "statement_descriptor_suffix"})
        intent = self.get("payment_intent", intent_id, param="intent")
        if intent["status"] != "requires_capture":
            raise self._unexpected_state(intent, "capture", ("requires_capture",))
        amount = integer(params, "amount_to_capture", minimum=1)
        amount = intent["amount_capturable"] if amount is None else amount
        if amount > intent["amount_capturable"]:
            raise invalid(f"The amount_to_capture ({amount}) cannot be greater than the PaymentIntent's "
                          f"amount_capturable ({intent['amount_capturable']}).", param="amount_to_capture",
                          code="amount_too_large")
        metadata = metadata_update(intent["metadata"], params)
        charge = self.objects[intent["latest_charge"]]
        charge.update(captured=True, amount_captured=amount)
        intent.update(status="succeeded", amount_received=amount, amount_capturable=0, metadata=metadata)
        self.emit("charge.captured", charge)
        self.emit("payment_intent.succeeded", intent)
        return intent

    def cancel_payment_intent(self, params: dict[str, Any], intent_id: str) -> dict[str, Any]:
        only(params, {"cancellation_reason"})
        intent = self.get("payment_intent", intent_id, param="intent")
        if intent["status"] not in PI_CANCELABLE:
            raise self._unexpected_state(intent, "cancel", PI_CANCELABLE)
        intent.update(status="canceled", amount_capturable=0, canceled_at=self.now(), next_action=None,
                      cancellation_reason=text(params, "cancellation_reason", choices=CANCELLATION_REASONS))
        self.emit("payment_intent.canceled", intent)
        return intent

    def _unexpected_state(self, intent: dict[str, Any], action: str, allowed: tuple[str, ...]) -> StripeError:
        return invalid(f"You cannot {action} this PaymentIntent because it has a status of {intent['status']}. "
                       f"Only a PaymentIntent with one of the following statuses allows it: {', '.join(allowed)}.",
                       code="payment_intent_unexpected_state", payment_intent=copy.deepcopy(intent))

    def list_payment_intents(self, params: dict[str, Any]) -> dict[str, Any]:
        customer_id = text(params, "customer")
        return self.list_of("payment_intent", params, "/v1/payment_intents",
                            lambda i: customer_id is None or i["customer"] == customer_id, {"customer"})

    # charges --------------------------------------------------------------------------------

    def retrieve_charge(self, params: dict[str, Any], charge_id: str) -> dict[str, Any]:
        only(params, set())
        return self.get("charge", charge_id, param="charge")

    def list_charges(self, params: dict[str, Any]) -> dict[str, Any]:
        intent_id, customer_id = text(params, "payment_intent"), text(params, "customer")
        return self.list_of("charge", params, "/v1/charges",
                            lambda c: intent_id in (None, c["payment_intent"]) and customer_id in (None, c["customer"]),
                            {"payment_intent", "customer"})

    # refunds --------------------------------------------------------------------------------

    def create_refund(self, params: dict[str, Any]) -> dict[str, Any]:
        only(params, {"payment_intent", "charge", "amount", "reason", "metadata"})
        charge = self._refundable_charge(params)
        refundable = charge["amount_captured"] - charge["amount_refunded"]
        if refundable == 0:
            raise invalid(f"Charge {charge['id']} has already been refunded.", code="charge_already_refunded")
        amount = integer(params, "amount", minimum=1)
        amount = refundable if amount is None else amount
        if amount > refundable:
            raise invalid(f"Refund amount ({format_amount(amount, charge['currency'])}) is greater than unrefunded amount "
                          f"on charge ({format_amount(refundable, charge['currency'])})", param="amount", code="amount_too_large")
        refund = self._store({
            "id": self.new_id("re"), "object": "refund", "amount": amount, "charge": charge["id"], "created": self.now(),
            "currency": charge["currency"], "metadata": metadata_update({}, params), "payment_intent": charge["payment_intent"],
            "reason": text(params, "reason", choices=REFUND_REASONS), "status": "succeeded",
        })
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount_captured"]
        self.emit("refund.created", refund)
        self.emit("charge.refunded", charge)
        return refund

    def _refundable_charge(self, params: dict[str, Any]) -> dict[str, Any]:
        intent_id, charge_id = text(params, "payment_intent"), text(params, "charge")
        if (intent_id is None) == (charge_id is None):
            raise invalid("Provide exactly one of payment_intent or charge.", param="payment_intent", code="parameter_missing")
        if intent_id is not None:
            intent = self.get("payment_intent", intent_id, param="payment_intent", http_status=400)
            if intent["status"] != "succeeded":
                raise invalid(f"This PaymentIntent ({intent_id}) does not have a successful charge to refund.",
                              param="payment_intent", code="charge_not_refundable")
            return self.objects[intent["latest_charge"]]
        charge = self.get("charge", charge_id, param="charge", http_status=400)
        if not charge["captured"]:
            raise invalid(f"Charge {charge_id} has not been captured and cannot be refunded.", param="charge",
                          code="charge_not_refundable")
        return charge

    def retrieve_refund(self, params: dict[str, Any], refund_id: str) -> dict[str, Any]:
        only(params, set())
        return self.get("refund", refund_id, param="refund")

    def list_refunds(self, params: dict[str, Any]) -> dict[str, Any]:
        intent_id, charge_id = text(params, "payment_intent"), text(params, "charge")
        return self.list_of("refund", params, "/v1/refunds",
                            lambda r: intent_id in (None, r["payment_intent"]) and charge_id in (None, r["charge"]),
                            {"payment_intent", "charge"})

    # events ---------------------------------------------------------------------------------

    def retrieve_event(self, params: dict[str, Any], event_id: str) -> dict[str, Any]:
        only(params, set())
        return self.get("event", event_id)

    def list_events(self, params: dict[str, Any]) -> dict[str, Any]:
        """`type` may end in `.*` as in Stripe (`payment_intent.*`); `types[]` lists several."""
        patterns = array(params, "types") or ([text(params, "type")] if params.get("type") is not None else [])

        def wanted(event: dict[str, Any]) -> bool:
            return not patterns or any(event["type"] == p or (p.endswith(".*") and event["type"].startswith(p[:-1]))
                                       for p in patterns)

        return self.list_of("event", params, "/v1/events", wanted, {"type", "types", "delivery_success"})


def _route(method: str, pattern: str, operation: Callable[..., dict[str, Any]]):
    return method, re.compile(pattern.replace("{id}", "([^/]+)")), operation


ROUTES = [
    _route("POST", "/v1/customers", StripeState.create_customer),
    _route("GET", "/v1/customers", StripeState.list_customers),
    _route("GET", "/v1/customers/{id}", StripeState.retrieve_customer),
    _route("POST", "/v1/customers/{id}", StripeState.update_customer),
    _route("DELETE", "/v1/customers/{id}", StripeState.delete_customer),
    _route("GET", "/v1/customers/{id}/payment_methods", lambda s, p, c: s.list_payment_methods(p, c)),
    _route("POST", "/v1/payment_methods", StripeState.create_payment_method),
    _route("GET", "/v1/payment_methods", StripeState.list_payment_methods),
    _route("GET", "/v1/payment_methods/{id}", StripeState.retrieve_payment_method),
    _route("POST", "/v1/payment_methods/{id}/attach", StripeState.attach_payment_method),
    _route("POST", "/v1/payment_methods/{id}/detach", StripeState.detach_payment_method),
    _route("POST", "/v1/payment_intents", StripeState.create_payment_intent),
    _route("GET", "/v1/payment_intents", StripeState.list_payment_intents),
    _route("GET", "/v1/payment_intents/{id}", StripeState.retrieve_payment_intent),
    _route("POST", "/v1/payment_intents/{id}", StripeState.update_payment_intent),
    _route("POST", "/v1/payment_intents/{id}/confirm", StripeState.confirm_payment_intent),
    _route("POST", "/v1/payment_intents/{id}/capture", StripeState.capture_payment_intent),
    _route("POST", "/v1/payment_intents/{id}/cancel", StripeState.cancel_payment_intent),
    _route("GET", "/v1/charges", StripeState.list_charges),
    _route("GET", "/v1/charges/{id}", StripeState.retrieve_charge),
    _route("POST", "/v1/refunds", StripeState.create_refund),
    _route("GET", "/v1/refunds", StripeState.list_refunds),
    _route("GET", "/v1/refunds/{id}", StripeState.retrieve_refund),
    _route("GET", "/v1/events", StripeState.list_events),
    _route("GET", "/v1/events/{id}", StripeState.retrieve_event),
]


# --- idempotency --------------------------------------------------------------------------

@dataclass
class StoredResponse:
    method: str
    path: str
    fingerprint: str
    http_status: int
    body: bytes
    request_id: str


class IdempotencyKeys:
    """Stripe's promise: a POST retried with the same `Idempotency-Key` and the same
    parameters gets the first answer again (not a second effect); the same key with other
    parameters or another endpoint is an `idempotency_error`. As in Stripe, an answer is kept
    only once the endpoint started executing: a request refused by validation (400) or an
    unknown id (404) may be retried with the same key after fixing it. Keys do not expire here."""

    def __init__(self) -> None:
        self._stored: dict[str, StoredResponse] = {}

    def replay(self, key: str, method: str, path: str, params: dict[str, Any]) -> StoredResponse | None:
        stored = self._stored.get(key)
        if stored is None:
            return None
        if (stored.method, stored.path, stored.fingerprint) != (method, path, params_fingerprint(params)):
            raise StripeError(400, f"Keys for idempotent requests can only be used with the same parameters they were "
                              f"first used with. Try using a key other than '{key}' if you meant to execute a different "
                              "request.", type="idempotency_error")
        return stored

    def remember(self, key: str, method: str, path: str, params: dict[str, Any], http_status: int, body: bytes,
                 request_id: str) -> None:
        if http_status in (400, 404):
            return
        self._stored[key] = StoredResponse(method, path, params_fingerprint(params), http_status, body, request_id)

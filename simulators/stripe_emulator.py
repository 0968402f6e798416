"""A local, stateful emulator of the Stripe API subset the backend uses, so the real `stripe`
SDK can be exercised without the internet, and webhooks arrive the way Stripe sends them.

    with StripeEmulator(webhook_url="http://127.0.0.1:8000/api/payment/webhook/stripe",
                        webhook_secret="whsec_test", webhook_options=WebhookOptions(duplicates=2, shuffle=True),
                        seed=7) as emu:
        client = stripe.StripeClient(emu.api_key, base_addresses={"api": emu.api_base})
        client.v1.payment_intents.create(params={"amount": 500, "currency": "usd", "payment_method": "pm_card_visa",
                                                 "confirm": True})
        emu.wait_for_deliveries()

`async with StripeEmulator(...)` works the same. The server (Litestar under uvicorn) runs on its
own thread and event loop, so a blocking SDK call made from a test's event loop cannot starve it,
and the webhook receiver may live on the caller's loop. What Stripe does is in stripe_state.py
(pure); this module is the HTTP face, API keys, idempotency keys, and webhook delivery with the
faults Stripe promises: at least once (duplicates), in no particular order (shuffle, delays),
retried on failure with backoff. Random choices come from one seeded generator, drawn in event
order, so a run is reproducible. `powerbank stripe-emulator` serves it standalone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import random
import re
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable
from urllib.parse import parse_qsl

import httpx
import stripe
import uvicorn
from litestar import Litestar, Request, Response, route

from powerbank.payment_gateway import StripeHTTPXClient  # noqa: F401  (moved; still importable here)
from powerbank.simulators.stripe_state import API_VERSION, IdempotencyKeys, StripeError, StripeState

DEFAULT_API_KEY = "sk_test_emulator"
DEFAULT_PORT = 12111  # stripe-mock's port, so tools that know it find this one


# --- wire format --------------------------------------------------------------------------

_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")


def parse_form(raw: str) -> dict[str, Any]:
    """Stripe's bracket notation to nested values: `metadata[k]=v` -> {"metadata": {"k": "v"}},
    `expand[0]=a` (what the SDK sends) and `expand[]=a` -> {"expand": {"0": "a"}}, which
    stripe_state.array() reads as a list. Every leaf stays a string, as on the wire."""
    counters: dict[str, int] = {}
    params: dict[str, Any] = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        if key.endswith("[]"):
            base = key[:-2]
            counters[base] = counters.get(base, -1) + 1
            key = f"{base}[{counters[base]}]"
        match = _KEY.fullmatch(key)
        if match is None:
            raise StripeError(400, f"Invalid parameter name: {key}", param=key)
        _put(params, [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))], value, key)
    return params


def _put(container: dict[str, Any], path: list[str], value: str, key: str) -> None:
    *parents, leaf = path
    for part in parents:
        child = container.setdefault(part, {})
        if not isinstance(child, dict):
            raise StripeError(400, f"Invalid parameter structure at {key}", param=key)
        container = child
    if isinstance(container.get(leaf), dict):
        raise StripeError(400, f"Invalid parameter structure at {key}", param=key)
    container[leaf] = value


def stripe_signature_header(payload: bytes, secret: str, timestamp_s: int) -> str:
    """`Stripe-Signature` exactly as Stripe computes it: HMAC-SHA256, keyed by the whole
    endpoint secret (`whsec_...`), over "<timestamp>.<payload>". Public so tests can forge a
    bad signature or a stale timestamp."""
    signed = f"{timestamp_s}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp_s},v1={digest}"


def _api_key_of(authorization: str | None) -> str | None:
    """Bearer auth as the SDK sends it; Basic (`curl -u sk_test_...:`) as Stripe also accepts."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value).decode().split(":", 1)[0] or None
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def _authentication_error(key: str | None) -> StripeError:
    if key is None:
        return StripeError(401, "You did not provide an API key. You need to provide your API key in the Authorization "
                                "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').")
    return StripeError(401, f"Invalid API Key provided: {key[:8]}{'*' * max(0, len(key) - 12)}{key[-4:]}")


# --- webhooks -----------------------------------------------------------------------------

@dataclass(frozen=True)
class WebhookOptions:
    """How deliveries misbehave, as Stripe's promises allow.

    retries: more attempts after a non-2xx answer or a connection error (Stripe: for 3 days);
        attempt n+1 waits retry_backoff_ms * 2**(n-1), at most retry_backoff_max_ms.
    duplicates: extra copies of every event; duplicate_rate: chance of one more extra copy.
    delay_ms: each copy waits a random time in this range (an int is a fixed delay).
    shuffle: deliveries ready at the same moment go out in random order instead of event
        order; with delay_ms or hold_webhooks() this reorders across requests.
    concurrency: deliveries in flight at once per endpoint (above 1, duplicates can race).
    """

    retries: int = 3
    retry_backoff_ms: int = 50
    retry_backoff_max_ms: int = 2_000
    duplicates: int = 0
    duplicate_rate: float = 0.0
    delay_ms: int | tuple[int, int] = 0
    shuffle: bool = False
    concurrency: int = 1
    timeout_s: float = 10.0

    def delay_range_ms(self) -> tuple[int, int]:
        low, high = (self.delay_ms, self.delay_ms) if isinstance(self.delay_ms, int) else self.delay_ms
        if not 0 <= low <= high:
            raise ValueError(f"delay_ms must be a non-negative int or (low, high) with low <= high, not {self.delay_ms!r}")
        return low, high

    def backoff_ms(self, attempt: int) -> int:
        return min(self.retry_backoff_ms * 2 ** (attempt - 1), self.retry_backoff_max_ms)


@dataclass
class WebhookEndpoint:
    url: str
    secret: str
    enabled_events: tuple[str, ...] = ("*",)
    options: WebhookOptions = field(default_factory=WebhookOptions)

    def wants(self, event_type: str) -> bool:
        return any(p == "*" or p == event_type or (p.endswith(".*") and event_type.startswith(p[:-1]))
                   for p in self.enabled_events)


@dataclass(frozen=True)
class DeliveryAttempt:
    """One POST of one event to one endpoint. `copy` 0 is the original, 1.. the duplicates;
    `attempt` counts retries of that copy from 1."""

    event_id: str
    event_type: str
    url: str
    copy: int
    attempt: int
    status_code: int | None
    error: str | None
    sent_at_s: float
    elapsed_ms: float

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass
class _Delivery:
    event: dict[str, Any]
    payload: bytes
    copy: int
    due: float  # loop time
    order: float  # sort key among ready deliveries: due time, or a random draw when shuffling
    seq: int
    attempt: int = 1


class _Sender:
    """Delivers to one endpoint from a queue of due deliveries, up to `concurrency` at once.
    Lives on the emulator's loop."""

    def __init__(self, emulator: StripeEmulator, endpoint: WebhookEndpoint) -> None:
        self.emulator = emulator
        self.endpoint = endpoint
        self.pending: list[_Delivery] = []
        self.in_flight: set[asyncio.Task] = set()
        self.wake = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def push(self, delivery: _Delivery) -> None:
        self.pending.append(delivery)
        self.wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.wake.clear()
            now = loop.time()
            free = len(self.in_flight) < self.endpoint.options.concurrency
            ready = [d for d in self.pending if d.due <= now] if free and not self.emulator.held else []
            if ready:
                delivery = min(ready, key=lambda d: (d.order, d.seq))
                self.pending.remove(delivery)
                task = loop.create_task(self._send(delivery))
                self.in_flight.add(task)
                task.add_done_callback(self._sent)
                continue
            timeout = None
            if free and self.pending and not self.emulator.held:
                timeout = max(0.0, min(d.due for d in self.pending) - now)
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except TimeoutError:
                pass

    def _sent(self, task: asyncio.Task) -> None:
        self.in_flight.discard(task)
        self.wake.set()

    async def _send(self, delivery: _Delivery) -> None:
        options = self.endpoint.options
        sent_at_s = time.time()
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": stripe_signature_header(delivery.payload, self.endpoint.secret, int(sent_at_s)),
        }
        started = time.monotonic()
        status_code, error = None, None
        try:
            response = await self.emulator.http.post(self.endpoint.url, content=delivery.payload, headers=headers,
                                                     timeout=options.timeout_s)
            status_code = response.status_code
        except Exception as exc:  # any failure to deliver is a failed attempt, as for Stripe
            error = f"{type(exc).__name__}: {exc}"
        attempt = DeliveryAttempt(delivery.event["id"], delivery.event["type"], self.endpoint.url, delivery.copy,
                                  delivery.attempt, status_code, error, sent_at_s, (time.monotonic() - started) * 1000)
        self.emulator._record(attempt)
        if not attempt.ok and delivery.attempt <= options.retries:
            loop = asyncio.get_running_loop()
            due = loop.time() + options.backoff_ms(delivery.attempt) / 1000
            self.push(replace(delivery, attempt=delivery.attempt + 1, due=due,
                              order=self.emulator.order_key(options, due)))
        else:
            self.emulator._finished()


# --- the server ---------------------------------------------------------------------------

class StripeEmulator:
    """One emulated Stripe account served over HTTP on 127.0.0.1.

    Options: `api_key` (the secret key clients must send), `port` (0 = a free one),
    `webhook_url` + `webhook_secret` (a first endpoint; more with add_webhook_endpoint),
    `webhook_options` (WebhookOptions), `seed` (ids and delivery faults reproducible),
    `processing_delay_ms` (None: cards settle at once as in Stripe; a number: confirmed intents
    sit in `processing` that long before succeeding, as bank debits do),
    `enforce_minimum_amount` (Stripe's minimum charge per currency, e.g. 50 for usd).
    """

    def __init__(self, *, api_key: str = DEFAULT_API_KEY, host: str = "127.0.0.1", port: int = 0,
                 webhook_url: str | None = None, webhook_secret: str | None = None,
                 webhook_options: WebhookOptions | None = None, seed: int | None = None,
                 processing_delay_ms: int | None = None, enforce_minimum_amount: bool = True) -> None:
        self.api_key = api_key
        self.host = host
        self.port = port
        self.webhook_options = webhook_options or WebhookOptions()
        self.webhook_options.delay_range_ms()  # fail here on a bad range, not on the server thread
        self.processing_delay_ms = processing_delay_ms
        self.state = StripeState(seed=seed, processing=processing_delay_ms is not None,
                                 enforce_minimum_amount=enforce_minimum_amount)
        self.idempotency = IdempotencyKeys()
        self.endpoints: list[WebhookEndpoint] = []
        self.held = False
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # guards state, idempotency keys and the delivery log
        self._attempts: list[DeliveryAttempt] = []
        self._senders: dict[int, _Sender] = {}
        self._outstanding = 0  # deliveries not yet delivered or given up, plus pending settlements
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        if webhook_url is not None:
            self.add_webhook_endpoint(webhook_url, webhook_secret)

    # lifecycle ------------------------------------------------------------------------------

    @property
    def api_base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> StripeEmulator:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it: no 40 ms Nagle stalls
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve_thread, args=(sock,), name="stripe-emulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise RuntimeError("the Stripe emulator did not start") from self._startup_error
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()
        self._thread = self._loop = None

    def __enter__(self) -> StripeEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> StripeEmulator:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def _serve_thread(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(sock))
        except BaseException as exc:  # never leave start() waiting
            self._startup_error = self._startup_error or exc
            self._ready.set()
            raise
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.http = httpx.AsyncClient()
        config = uvicorn.Config(build_app(self), log_level="warning", access_log=False, lifespan="off", ws="none",
                                timeout_graceful_shutdown=1)
        server = _ThreadServer(config)
        self._senders = {id(e): _Sender(self, e) for e in self.endpoints}  # before the first request can come
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                if serving.done():
                    serving.result()
                    raise RuntimeError("uvicorn stopped while starting")
                await asyncio.sleep(0.005)
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            await self._close_senders()
            return
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.should_exit = True
            server.exit_requested.set()
            await serving
            await self._close_senders()

    async def _close_senders(self) -> None:
        """Deliveries still queued at stop are dropped, like a Stripe account that is deleted."""
        for sender in self._senders.values():
            for task in (sender.task, *sender.in_flight):
                task.cancel()
            await asyncio.gather(sender.task, *sender.in_flight, return_exceptions=True)
        await self.http.aclose()

    def _call_on_loop(self, callback, *args) -> None:
        """Run `callback` on the emulator's loop: directly from its own thread, else queued."""
        if threading.current_thread() is self._thread:
            callback(*args)
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(callback, *args)

    def _run_on_loop(self, coroutine):
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the Stripe emulator is not running (use start() or `with`)")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    # the API --------------------------------------------------------------------------------

    def api_request(self, method: str, path: str, raw_params: str, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        """One HTTP request to (status, body, headers). Runs on the emulator's loop, and holds the
        lock only while the state changes (no waiting inside)."""
        request_id = "req_" + secrets.token_hex(7)
        key = headers.get("idempotency-key") if method == "POST" else None
        out = {"Request-Id": request_id, "Stripe-Version": headers.get("stripe-version") or API_VERSION}
        if key:
            out["Idempotency-Key"] = key
        api_key = _api_key_of(headers.get("authorization"))
        try:
            if api_key != self.api_key:
                raise _authentication_error(api_key)
            params = parse_form(raw_params)
        except StripeError as error:
            return error.http_status, json.dumps(error.body()).encode(), out
        with self._lock:
            try:
                stored = self.idempotency.replay(key, method, path, params) if key else None
            except StripeError as error:
                return error.http_status, json.dumps(error.body()).encode(), out
            if stored is not None:
                return stored.http_status, stored.body, {**out, "Request-Id": stored.request_id, "Idempotent-Replayed": "true"}
            status, body = self.state.handle(method, path, params, request={"id": request_id, "idempotency_key": key})
            raw = json.dumps(body).encode()
            if key:
                self.idempotency.remember(key, method, path, params, status, raw, request_id)
            events = self.state.take_new_events()
        self._schedule(events)
        return status, raw, out

    # test helpers ---------------------------------------------------------------------------

    def complete_action(self, intent_id: str, *, succeed: bool = True) -> dict[str, Any]:
        """The customer passes (or fails) 3D Secure for an intent in `requires_action`; the intent
        then proceeds on its own (succeeded, requires_capture, processing or payment_failed) and
        its webhooks follow. Raises StripeError if the intent is not waiting for an action."""
        return self._helper(lambda: self.state.complete_action(intent_id, succeed=succeed))

    def settle(self, intent_id: str) -> dict[str, Any]:
        """A `processing` intent finishes now instead of after processing_delay_ms."""
        return self._helper(lambda: self.state.settle(intent_id))

    def _helper(self, change) -> dict[str, Any]:
        with self._lock:
            result = json.loads(json.dumps(change()))
            events = self.state.take_new_events()
        self._call_on_loop(self._schedule, events)
        return result

    def get(self, object_id: str) -> dict[str, Any]:
        """Any object by id, as the API would return it (a copy)."""
        with self._lock:
            return json.loads(json.dumps(self.state.objects[object_id]))

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event so far, oldest first."""
        with self._lock:
            return [json.loads(json.dumps(self.state.objects[i])) for i in self.state.order["event"]]

    @property
    def deliveries(self) -> list[DeliveryAttempt]:
        """Every delivery attempt so far, in the order they finished."""
        with self._lock:
            return list(self._attempts)

    def add_webhook_endpoint(self, url: str, secret: str | None = None, *, enabled_events: Iterable[str] = ("*",),
                             options: WebhookOptions | None = None) -> WebhookEndpoint:
        """Deliver future events to `url`, signed with `secret` (a fresh whsec_ when None)."""
        endpoint = WebhookEndpoint(url, secret or "whsec_" + secrets.token_hex(16), tuple(enabled_events),
                                   options or self.webhook_options)
        endpoint.options.delay_range_ms()
        if self._loop is None:
            self.endpoints.append(endpoint)  # its sender starts with the server
        else:
            self._call_on_loop(self._add_sender, endpoint)
        return endpoint

    def _add_sender(self, endpoint: WebhookEndpoint) -> None:
        self.endpoints.append(endpoint)
        self._senders[id(endpoint)] = _Sender(self, endpoint)

    def resend_event(self, event_id: str) -> None:
        """Deliver an event once more to every endpoint that wants it (the dashboard's Resend)."""
        event = self.get(event_id)
        self._call_on_loop(self._schedule, [event], True)

    def hold_webhooks(self) -> None:
        """Queue deliveries without sending them, e.g. to shuffle a whole batch at release."""
        self.held = True

    def release_webhooks(self) -> None:
        self.held = False
        self._call_on_loop(lambda: [s.wake.set() for s in self._senders.values()])

    def wait_for_deliveries(self, timeout_s: float = 10.0) -> None:
        """Block until every queued delivery succeeded or used up its retries (and every
        `processing` intent settled). Raises TimeoutError otherwise, e.g. while held."""
        self._run_on_loop(self._wait_idle(timeout_s)).result()

    async def wait_for_deliveries_async(self, timeout_s: float = 10.0) -> None:
        """wait_for_deliveries for async code: the caller's loop keeps running meanwhile."""
        await asyncio.wrap_future(self._run_on_loop(self._wait_idle(timeout_s)))

    async def _wait_idle(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"{self._outstanding} webhook deliveries or settlements still pending after "
                               f"{timeout_s} s{' (webhooks are held)' if self.held else ''}") from None

    # delivery bookkeeping (on the emulator's loop) -------------------------------------------

    def _schedule(self, events: list[dict[str, Any]], resend: bool = False) -> None:
        """Queue each event for each endpoint that wants it: the copies, their delays and their
        shuffle order are drawn here, in event order, so a seed reproduces them."""
        loop = asyncio.get_running_loop()
        for event in events:
            if event["type"] == "payment_intent.processing" and not resend:
                self._busy()
                loop.call_later(self.processing_delay_ms / 1000, self._settle_later, event["data"]["object"]["id"])
            payload = json.dumps(event).encode()
            for endpoint in self.endpoints:
                if not endpoint.wants(event["type"]):
                    continue
                options = endpoint.options
                copies = 1 if resend else 1 + options.duplicates + (self._rng.random() < options.duplicate_rate)
                for copy in range(copies):
                    low, high = options.delay_range_ms()
                    due = loop.time() + self._rng.randint(low, high) / 1000
                    self._seq += 1
                    self._busy()
                    self._senders[id(endpoint)].push(_Delivery(event, payload, copy, due, self.order_key(options, due), self._seq))

    def order_key(self, options: WebhookOptions, due: float) -> float:
        return self._rng.random() if options.shuffle else due

    def _settle_later(self, intent_id: str) -> None:
        try:
            with self._lock:
                self.state.settle(intent_id)
                events = self.state.take_new_events()
            self._schedule(events)
        except StripeError:
            pass  # settled early by settle()
        finally:
            self._finished()

    def _busy(self) -> None:
        self._outstanding += 1
        self._idle.clear()

    def _finished(self) -> None:
        self._outstanding -= 1
        if self._outstanding == 0:
            self._idle.set()

    def _record(self, attempt: DeliveryAttempt) -> None:
        with self._lock:
            self._attempts.append(attempt)

    # conveniences ---------------------------------------------------------------------------

    def stripe_client(self, **kwargs: Any):
        """A `stripe.StripeClient` pointed at this emulator (kwargs go to StripeClient, e.g.
        http_client=StripeHTTPXClient(allow_sync_methods=True), which the caller closes)."""
        return stripe.StripeClient(self.api_key, base_addresses={"api": self.api_base}, **kwargs)


class _ThreadServer(uvicorn.Server):
    """Signals belong to the main thread (or the CLI), not to the emulator's thread; and stop()
    wakes the server at once instead of at uvicorn's next 100 ms tick (tests start many)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.exit_requested = asyncio.Event()

    async def main_loop(self) -> None:
        await self.exit_requested.wait()

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def build_app(emulator: StripeEmulator) -> Litestar:
    """One catch-all route: Stripe's paths, errors and form bodies are handled by the emulator
    itself so every answer, 404s included, has Stripe's shape."""

    @route("/{path:path}", http_method=["GET", "POST", "DELETE"])
    async def stripe_api(request: Request) -> Response:
        raw = (await request.body()).decode() if request.method == "POST" else request.scope.get("query_string", b"").decode()
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, body, out = emulator.api_request(request.method, request.url.path, raw, headers)
        return Response(content=body, status_code=status, headers=out, media_type="application/json")

    return Litestar(route_handlers=[stripe_api], openapi_config=None, logging_config=None, debug=False)


# --- CLI ----------------------------------------------------------------------------------

def serve_forever(emulator: StripeEmulator) -> int:
    """Run until SIGINT or SIGTERM; print one JSON line with what a client needs first."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with emulator:
        endpoints = [{"url": e.url, "secret": e.secret} for e in emulator.endpoints]
        print(json.dumps({"api_base": emulator.api_base, "api_key": emulator.api_key, "webhook_endpoints": endpoints}),
              flush=True)
        stop.wait()
    return 0


def parse_delay_ms(text: str) -> int | tuple[int, int]:
    """'20' or '0:200' (a range) for --delay-ms."""
    low, _, high = text.partition(":")
    return (int(low), int(high)) if high else int(low)

"""Simulated app users driving the real HTTP API and websocket.

A `Rider` is one person with a phone: signs up or in by OTP (the server must run with
POWERBANK_OTP_ECHO=1 so the code comes back in the response), follows their rentals on the
websocket, rents and returns. A `RiderCrowd` keeps N riders renting at random stations, holding
the bank for a short random time and handing it back through the caller's `return_bank(bank_serial,
station_sn)` callback (the demo wires it to the station fleet simulator, which inserts the bank
and reports it over MQTT). `Admin` credits wallets through the admin API.

This is a library; `powerbank demo` and `powerbank simulate` drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake

log = logging.getLogger(__name__)

FINAL_STATUSES = frozenset({"completed", "cancelled", "lost"})
STARTED_STATUSES = frozenset({"active", "overdue", "completed", "lost"})
CLOSE_UNAUTHORIZED = 4401
HTTP_TIMEOUT_S = 60.0
WS_RECONNECT_DELAY_S = 0.5
POLL_INTERVAL_S = 2.0  # while the websocket is down
POLL_INTERVAL_CONNECTED_S = 10.0  # a safety net only: events normally arrive first
STATIONS_REFRESH_S = 2.0
RETURN_ATTEMPTS = 5

ReturnBank = Callable[[str, str], Awaitable[Any]]


class RiderError(Exception):
    """The server answered something a rider cannot go on from."""


def ws_url_for(base_url: str) -> str:
    if base_url.startswith("https://"):
        return "wss://" + base_url[len("https://"):].rstrip("/") + "/api/ws"
    return "ws://" + base_url.removeprefix("http://").rstrip("/") + "/api/ws"


def merge_rental(known: dict[str, Any] | None, update: dict[str, Any]) -> dict[str, Any]:
    """Newest view wins, except that a final status is never replaced by an open one: bus
    messages from different processes can arrive out of order."""
    if known is not None and known.get("status") in FINAL_STATUSES and update.get("status") not in FINAL_STATUSES:
        return known
    return {**(known or {}), **update}


class Rider:
    """One simulated person using the app."""

    def __init__(
        self,
        base_url: str,
        phone: str,
        *,
        client: httpx.AsyncClient | None = None,
        device_id: str | None = None,
        full_name: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.phone = phone
        self.device_id = device_id or f"sim-{phone.lstrip('+')}"
        self.full_name = full_name
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(base_url=self.base_url, timeout=HTTP_TIMEOUT_S)
        self.user_id: str | None = None
        self.access_token: str | None = None
        self.refresh_token: str | None = None
        self.rentals: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._ws_task: asyncio.Task | None = None
        self._ws_connected = asyncio.Event()
        self._closing = False

    # --- identity -----------------------------------------------------------------------------

    async def sign_in(self) -> str:
        """Register (or log in, if the phone already has an account); returns the user id."""
        code = await self._request_code("register")
        if code is None:
            code = await self._request_code("login")
            purpose = "login"
        else:
            purpose = "register"
        body: dict[str, Any] = {"phone": self.phone, "code": code, "device_id": self.device_id, "platform": "other"}
        if purpose == "register" and self.full_name:
            body["full_name"] = self.full_name
        response = await self.client.post(self._url(f"/api/auth/{purpose}"), json=body)
        if response.status_code not in (200, 201):
            raise RiderError(f"{purpose} failed: {response.status_code} {response.text}")
        self._take_tokens(response.json())
        return self.user_id  # type: ignore[return-value]

    async def _request_code(self, purpose: str) -> str | None:
        """The echoed code, or None when the phone's account state does not fit `purpose`.
        Waits out a rate limit instead of failing (many riders share one address)."""
        for _ in range(20):
            response = await self.client.post(self._url("/api/auth/get-otp"), json={"phone": self.phone, "purpose": purpose})
            if response.status_code == 429:
                await asyncio.sleep(min(5.0, float(response.headers.get("retry-after", "1"))))
                continue
            if response.status_code in (404, 409):
                return None
            if response.status_code != 200:
                raise RiderError(f"get-otp failed: {response.status_code} {response.text}")
            code = response.json().get("debug_code")
            if code is None:
                raise RiderError("the server does not echo OTP codes: run it with POWERBANK_OTP_ECHO=1")
            return code
        raise RiderError("still rate limited after retries")

    def _take_tokens(self, body: dict[str, Any]) -> None:
        self.access_token = body["access_token"]
        self.refresh_token = body["refresh_token"]
        self.user_id = body["user"]["id"]

    async def refresh(self) -> None:
        response = await self.client.post(self._url("/api/auth/refresh"), json={"refresh_token": self.refresh_token})
        if response.status_code == 200:
            self._take_tokens(response.json())
        else:
            await self.sign_in()

    # --- HTTP ----------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.base_url + path

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An authenticated request; an expired access token is refreshed once."""
        response = await self._send(method, path, **kwargs)
        if response.status_code == 401:
            await self.refresh()
            response = await self._send(method, path, **kwargs)
        return response

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {self.access_token}"}
        return await self.client.request(method, self._url(path), headers=headers, **kwargs)

    async def rent(
        self, station_sn: str, package_id: str, idempotency_key: str | None = None
    ) -> tuple[int, dict[str, Any], float]:
        """POST /api/rentals/start: (HTTP status, body, latency in ms)."""
        body = {"station_sn": station_sn, "package_id": package_id, "idempotency_key": idempotency_key or uuid.uuid4().hex}
        started = time.perf_counter()
        response = await self.request("POST", "/api/rentals/start", json=body)
        latency_ms = (time.perf_counter() - started) * 1000
        try:
            payload = response.json()
        except ValueError:  # a proxy's HTML error page, say
            payload = {"error": f"http_{response.status_code}", "detail": response.text[:200]}
        rental = payload.get("rental") if response.status_code == 409 else payload
        if isinstance(rental, dict) and rental.get("id"):
            await self._remember(rental)
        return response.status_code, payload, latency_ms

    async def rental(self, rental_id: str) -> dict[str, Any] | None:
        response = await self.request("GET", f"/api/rentals/{rental_id}")
        if response.status_code != 200:
            return None
        view = response.json()
        await self._remember(view)
        return self.rentals[rental_id]

    async def active_rentals(self) -> list[dict[str, Any]]:
        response = await self.request("GET", "/api/rentals/active")
        response.raise_for_status()
        rentals = response.json()
        for rental in rentals:
            await self._remember(rental)
        return rentals

    async def history(self, page: int = 1, page_size: int = 20) -> dict[str, Any]:
        response = await self.request("GET", "/api/rentals/history", params={"page": page, "page_size": page_size})
        response.raise_for_status()
        return response.json()

    async def top_up_by_card(self, amount_minor: int, currency: str, payment_method: str = "pm_card_visa") -> dict[str, Any]:
        """A card top-up the way the app does it: an intent, then the provider's confirmation
        (here through verify-topup with a test card, where a phone would use Stripe's SDK).
        The wallet is credited once the payment succeeded; returns the intent's status."""
        key = uuid.uuid4().hex
        created = await self.request("POST", "/api/payment/wallet/topup-intent",
                                     json={"amount_minor": amount_minor, "currency": currency, "idempotency_key": key})
        if created.status_code != 201:
            raise RiderError(f"top-up intent failed: {created.status_code} {created.text}")
        intent_id = created.json()["intent"]["intent_id"]
        verified = await self.request("POST", "/api/payment/verify-topup",
                                      json={"intent_id": intent_id, "payment_method": payment_method})
        if verified.status_code != 200 or verified.json()["intent"]["status"] != "confirmed":
            raise RiderError(f"top-up not confirmed: {verified.status_code} {verified.text}")
        return verified.json()

    async def wallet(self) -> dict[str, Any]:
        response = await self.request("GET", "/api/user/wallet")
        response.raise_for_status()
        return response.json()

    async def stations(self, page_size: int = 100) -> list[dict[str, Any]]:
        """Every station, following the pages."""
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            response = await self.client.get(self._url("/api/app/stations"), params={"page": page, "page_size": page_size})
            response.raise_for_status()
            body = response.json()
            items.extend(body["items"])
            if page * page_size >= body["total"] or not body["items"]:
                return items
            page += 1

    async def packages(self) -> list[dict[str, Any]]:
        response = await self.client.get(self._url("/api/payment/packages"))
        response.raise_for_status()
        return response.json()

    # --- live events ---------------------------------------------------------------------------

    async def open_websocket(self, timeout_s: float = 10.0) -> None:
        """Connect and keep connected (reconnecting with a fresh token when needed)."""
        if self._ws_task is None:
            self._ws_task = asyncio.create_task(self._ws_loop())
        await asyncio.wait_for(self._ws_connected.wait(), timeout_s)

    async def _ws_loop(self) -> None:
        while not self._closing:
            try:
                async with websockets.connect(f"{ws_url_for(self.base_url)}?token={self.access_token}") as socket:
                    async for frame in socket:
                        await self._on_frame(frame)
            except ConnectionClosed as closed:
                if closed.rcvd is not None and closed.rcvd.code == CLOSE_UNAUTHORIZED and not self._closing:
                    with contextlib.suppress(Exception):
                        await self.refresh()
            except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
                log.debug("rider %s websocket: %r", self.phone, exc)
            finally:
                self._ws_connected.clear()
            if not self._closing:
                await asyncio.sleep(WS_RECONNECT_DELAY_S)

    async def _on_frame(self, frame: str | bytes) -> None:
        message = json.loads(frame)
        self.events.append(message)
        if message.get("type") == "hello":
            self._ws_connected.set()
        rental = message.get("rental")
        if isinstance(rental, dict) and rental.get("id"):
            await self._remember(rental)

    async def _remember(self, rental: dict[str, Any]) -> None:
        rental_id = str(rental["id"])
        async with self._changed:
            self.rentals[rental_id] = merge_rental(self.rentals.get(rental_id), rental)
            self._changed.notify_all()

    async def wait_for_rental(
        self, rental_id: str, statuses: set[str] | frozenset[str], timeout_s: float
    ) -> dict[str, Any] | None:
        """The rental once it reaches one of `statuses` (seen on the websocket, or by polling
        the API every couple of seconds in case an event was missed); None at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        next_poll = loop.time() + self._poll_interval_s()
        while True:
            current = self.rentals.get(rental_id)
            if current is not None and current.get("status") in statuses:
                return current
            now = loop.time()
            if now >= deadline:
                return None
            if now >= next_poll:
                next_poll = now + self._poll_interval_s()
                await self.rental(rental_id)
                continue
            async with self._changed:
                with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(deadline, next_poll) - now)

    def _poll_interval_s(self) -> float:
        return POLL_INTERVAL_CONNECTED_S if self._ws_connected.is_set() else POLL_INTERVAL_S

    async def close(self) -> None:
        self._closing = True
        if self._ws_task is not None:
            self._ws_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ws_task
        if self._own_client:
            await self.client.aclose()


class Admin:
    """An operator with an admin access token."""

    def __init__(self, base_url: str, token: str, *, client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(timeout=HTTP_TIMEOUT_S)
        self._currency: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def currency(self) -> str:
        """The installation's currency: what a wallet without rows reads as."""
        if self._currency is None:
            response = await self.client.get(self.base_url + "/api/user/wallet", headers=self.headers)
            response.raise_for_status()
            self._currency = response.json()["currency"]
        return self._currency

    async def credit(
        self,
        user_id: str,
        amount_minor: int,
        *,
        currency: str | None = None,
        reason: str = "simulator top-up",
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body = {
            "amount_minor": amount_minor,
            "currency": currency or await self.currency(),
            "reason": reason,
            "idempotency_key": idempotency_key or uuid.uuid4().hex,
        }
        response = await self.client.post(
            f"{self.base_url}/api/admin/wallets/{user_id}/credit", json=body, headers=self.headers
        )
        if response.status_code != 200:
            raise RiderError(f"credit failed: {response.status_code} {response.text}")
        return response.json()

    async def close(self) -> None:
        if self._own_client:
            await self.client.aclose()


@dataclass
class RiderStats:
    """What the crowd saw. `started` counts rentals that reached active; `completed` those the
    rider then saw completed (websocket or API); refusals are 409s by reason."""

    signed_in: int = 0
    attempts: int = 0
    started: int = 0
    completed: int = 0
    card_top_ups: int = 0
    refusals: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    start_latencies_ms: list[float] = field(default_factory=list)
    # For a load test's timeline and audit: when each rental became active (monotonic) and how
    # long that took from the request; when each was seen completed; every rental seen started
    # (id -> rider's phone); every bank handed back (rental id, bank serial, station serial);
    # the money each rider was credited (user id -> minor units).
    activations: list[tuple[float, float]] = field(default_factory=list)
    completions: list[float] = field(default_factory=list)
    acknowledged: dict[str, str] = field(default_factory=dict)
    returns: list[tuple[str, str, str]] = field(default_factory=list)
    credited_minor: Counter = field(default_factory=Counter)

    @property
    def holding(self) -> int:
        return self.started - self.completed

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.start_latencies_ms)

        def pct(fraction: float) -> float:
            if not ordered:
                return 0.0
            return round(ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))], 1)

        return {
            "signed_in": self.signed_in,
            "attempts": self.attempts,
            "started": self.started,
            "completed": self.completed,
            "refusals": dict(self.refusals),
            "errors": dict(self.errors),
            "start_latency_p50_ms": pct(0.5),
            "start_latency_p99_ms": pct(0.99),
        }


class RiderCrowd:
    """N riders renting at random stations until told to finish."""

    def __init__(
        self,
        base_url: str,
        n: int,
        *,
        return_bank: ReturnBank,
        admin_token: str | None = None,
        package_id: str | None = None,
        hold_s: tuple[float, float] = (1.0, 5.0),
        think_s: tuple[float, float] = (0.2, 2.0),
        top_up_minor: int = 1_000_000,
        card_top_ups: bool = False,
        start_wait_s: float = 40.0,
        completion_wait_s: float = 40.0,
        phone_prefix: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.n = n
        self.return_bank = return_bank
        self.admin_token = admin_token
        self.package_id = package_id
        self.hold_s = hold_s
        self.think_s = think_s
        self.top_up_minor = top_up_minor
        # Top up through the payment provider (its emulator in the demo) instead of admin credits.
        self.card_top_ups = card_top_ups
        self.currency: str | None = None
        self.start_wait_s = start_wait_s
        self.completion_wait_s = completion_wait_s
        self.rng = random.Random(seed)
        # A fresh block of numbers per crowd, so a re-run against the same database signs up
        # new people (a clash just logs in instead). "+97797" keeps clear of operators' and
        # admins' numbers such as the demo admin's +9779800000000.
        self.phone_prefix = phone_prefix or f"+97797{self.rng.randrange(1000):03d}"
        self.stats = RiderStats()
        self.riders: list[Rider] = []
        self._client: httpx.AsyncClient | None = None
        self._admin: Admin | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = asyncio.Event()
        self._stations: list[dict[str, Any]] = []
        self._stations_at = 0.0
        self._stations_lock = asyncio.Lock()

    def phone(self, index: int) -> str:
        return f"{self.phone_prefix}{index:05d}"

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=self.n + 10, max_keepalive_connections=self.n + 10)
        self._client = httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, limits=limits)
        if self.admin_token:
            self._admin = Admin(self.base_url, self.admin_token, client=self._client)
        if self.package_id is None:
            self.package_id = await self._default_package()
        for index in range(self.n):
            rider = Rider(self.base_url, self.phone(index), client=self._client, full_name=f"Rider {index}")
            self.riders.append(rider)
            self._tasks.append(asyncio.create_task(self._live(rider), name=f"rider-{index}"))

    async def _default_package(self) -> str:
        assert self._client is not None
        response = await self._client.get(self.base_url + "/api/payment/packages")
        response.raise_for_status()
        packages = response.json()
        if not packages:
            raise RiderError("no active rental package to rent with")
        return packages[0]["id"]

    async def finish(self, timeout_s: float = 60.0) -> None:
        """No new rentals; riders return what they hold and wait to see it completed."""
        self._stopping.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for rider in self.riders:
            await rider.close()
        if self._client is not None:
            await self._client.aclose()

    async def run(self, duration_s: float, finish_timeout_s: float = 60.0) -> RiderStats:
        await self.start()
        try:
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), duration_s)
            await self.finish(finish_timeout_s)
        finally:
            await self.stop()
        return self.stats

    # --- one rider's life ----------------------------------------------------------------------

    async def _live(self, rider: Rider) -> None:
        try:
            await rider.sign_in()
            self.stats.signed_in += 1
            await self._top_up(rider)
            await rider.open_websocket()
        except Exception as exc:  # a rider failing must not take the crowd down; count it
            log.warning("rider %s could not get going: %r", rider.phone, exc)
            self.stats.errors[type(exc).__name__] += 1
            return
        held: list[dict[str, Any]] = []  # rentals whose bank this rider still has
        while not self._stopping.is_set():
            await self._pause(self.think_s)
            try:
                if held:
                    await self._return_held(rider, held)
                elif not self._stopping.is_set():
                    await self._one_rental(rider, held)
            except Exception as exc:
                # A timeout or a dropped connection mid-rental: count it, then look for a bank
                # this rider has without knowing (the start may have succeeded unseen).
                log.info("rider %s: %r", rider.phone, exc)
                self.stats.errors[type(exc).__name__] += 1
                await self._adopt_unseen_rentals(rider, held)
        # Finishing: hand back whatever is still out (finish() bounds how long this may take).
        while held:
            with contextlib.suppress(Exception):
                await self._adopt_unseen_rentals(rider, held)
                await self._return_held(rider, held)
            if held:
                await asyncio.sleep(0.5)

    async def _top_up(self, rider: Rider) -> None:
        if self.top_up_minor <= 0:
            return
        if self.card_top_ups:
            currency = self.currency or (await rider.wallet())["currency"]
            await rider.top_up_by_card(self.top_up_minor, currency)
            self.stats.card_top_ups += 1
        elif self._admin is not None:
            await self._admin.credit(rider.user_id, self.top_up_minor)
        else:
            return
        self.stats.credited_minor[str(rider.user_id)] += self.top_up_minor

    async def _adopt_unseen_rentals(self, rider: Rider, held: list[dict[str, Any]]) -> None:
        known = {str(r["id"]) for r in held}
        with contextlib.suppress(Exception):
            for rental in await rider.active_rentals():
                if str(rental["id"]) not in known and rental.get("status") in ("active", "overdue") and rental.get("power_bank_serial"):
                    self.stats.started += 1
                    self.stats.acknowledged[str(rental["id"])] = rider.phone
                    held.append(rental)

    async def _one_rental(self, rider: Rider, held: list[dict[str, Any]]) -> None:
        station = await self._pick_station(lambda s: s["status"] == "online" and s["available_banks"] > 0)
        if station is None:
            self.stats.errors["no_station_with_banks"] += 1
            await self._pause((0.5, 1.0))
            return
        self.stats.attempts += 1
        requested_at = time.perf_counter()
        status, body, latency_ms = await rider.rent(station["serial"], self.package_id)
        self.stats.start_latencies_ms.append(latency_ms)
        rental = await self._started_rental(rider, status, body)
        if rental is None:
            return
        self.stats.activations.append((time.monotonic(), (time.perf_counter() - requested_at) * 1000))
        self.stats.acknowledged[str(rental["id"])] = rider.phone
        self.stats.started += 1
        held.append(rental)
        await self._pause(self.hold_s)
        await self._return_held(rider, held)

    async def _return_held(self, rider: Rider, held: list[dict[str, Any]]) -> None:
        for rental in list(held):
            if not await self._return(rental):
                continue  # still held: tried again on the rider's next turn
            held.remove(rental)
            done = await rider.wait_for_rental(str(rental["id"]), FINAL_STATUSES, self.completion_wait_s)
            if done is not None and done["status"] == "completed":
                self.stats.completed += 1
                self.stats.completions.append(time.monotonic())
            else:
                self.stats.errors["return_not_completed"] += 1

    async def _started_rental(self, rider: Rider, status: int, body: dict[str, Any]) -> dict[str, Any] | None:
        """The active rental with its bank serial, or None (refusal counted)."""
        if status == 409:
            self._refused(body.get("error", "unknown"))
            if body.get("error") == "insufficient_funds":
                await self._top_up(rider)
            return None
        if status not in (201, 202):
            self.stats.errors[f"http_{status}"] += 1
            return None
        rental_id = str(body["id"])
        if body.get("status") not in STARTED_STATUSES:
            # Still ejecting: wait past the backend's eject deadline (and its one retry).
            seen = await rider.wait_for_rental(rental_id, STARTED_STATUSES | FINAL_STATUSES, self.start_wait_s)
            if seen is None:
                self.stats.errors["start_unresolved"] += 1
                return None
            if seen["status"] == "cancelled":
                self._refused(seen.get("cancel_reason") or "cancelled")
                return None
        rental = rider.rentals.get(rental_id, body)
        if not rental.get("power_bank_serial"):
            rental = await rider.rental(rental_id) or rental
        if not rental.get("power_bank_serial"):
            self.stats.errors["no_bank_serial"] += 1
            return None
        return rental

    def _refused(self, reason: str) -> None:
        self.stats.refusals[reason] += 1

    async def _return(self, rental: dict[str, Any]) -> bool:
        """Hand the bank to the fleet at a station with a free slot, trying a few stations
        (riders race each other for the last free slots)."""
        tried: set[str] = set()
        for _ in range(RETURN_ATTEMPTS):
            station = await self._pick_station(
                lambda s: s["status"] == "online" and s["empty_slots"] > 0 and s["serial"] not in tried, fresh=True
            )
            if station is None:
                break
            tried.add(station["serial"])
            try:
                accepted = await self.return_bank(rental["power_bank_serial"], station["serial"])
            except Exception as exc:
                log.info("return of %s at %s failed: %r", rental["power_bank_serial"], station["serial"], exc)
                continue
            if accepted is not False:
                self.stats.returns.append((str(rental["id"]), rental["power_bank_serial"], station["serial"]))
                return True
        self.stats.errors["return_retried"] += 1
        return False

    # --- shared helpers ------------------------------------------------------------------------

    async def _pause(self, bounds: tuple[float, float]) -> None:
        """A random wait that ends early when the crowd is finishing."""
        delay_s = self.rng.uniform(*bounds)
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay_s)

    async def _pick_station(self, wanted: Callable[[dict[str, Any]], bool], fresh: bool = False) -> dict[str, Any] | None:
        stations = await self._station_list(max_age_s=0.25 if fresh else STATIONS_REFRESH_S)
        candidates = [s for s in stations if wanted(s)]
        return self.rng.choice(candidates) if candidates else None

    async def _station_list(self, max_age_s: float) -> list[dict[str, Any]]:
        """One shared, briefly cached copy of the station list for the whole crowd."""
        async with self._stations_lock:
            if time.monotonic() - self._stations_at > max_age_s:
                self._stations = await self.riders[0].stations()
                self._stations_at = time.monotonic()
            return self._stations


async def run_riders(
    base_url: str,
    n: int,
    *,
    duration_s: float,
    return_bank: ReturnBank,
    admin_token: str | None = None,
    **options: Any,
) -> RiderStats:
    """Run a crowd of `n` riders for `duration_s`, then let them return what they hold."""
    crowd = RiderCrowd(base_url, n, return_bank=return_bank, admin_token=admin_token, **options)
    return await crowd.run(duration_s)

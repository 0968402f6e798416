"""Renting: start (awaits the Rental actor up to a deadline), active rentals, history.

The start request is idempotent: the rental id is derived from (person, idempotency_key), so a
retried tap or a lost response never starts a second rental. After the actor answers, the
response is read back from storage so it has the same shape as every other rental read.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter
from prometheus_client import Counter, Histogram
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from powerbank.http.auth import BEARER_SECURITY
from powerbank.http.deps import Paging, provide_paging, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.routes_profile import own_media
from powerbank.http.schemas import RentalPage, RentalRefused, RentalView, StartRentalRequest
from powerbank.http.schemas_app import (
    ExtendRentalRequest,
    LocationRecorded,
    LocationRequest,
    RentalExtensionView,
    RentalIssueRequest,
    RentalIssueView,
)
from powerbank.storage.models import PowerBank, Rental, RentalIssue, RentalLocation, RentalPackage, Reservation, Station
from powerbank.storage.types import utcnow

log = logging.getLogger(__name__)

RentalStarter = Callable[..., Awaitable[dict[str, Any]]]
RENTAL_NAMESPACE = uuid.UUID("b6a4f0de-51c3-4f3e-8a57-0c2d5e7f9a14")
OPEN_STATUSES = ("pending", "ejecting", "active", "overdue")

REFUSAL_TEXT = {
    "insufficient_funds": "not enough money in your wallet to hold this package's price",
    "too_many_active_rentals": "return your current power bank before renting another",
    "unpaid_dues": "pay your outstanding dues first",
    "no_bank_available": "no charged power bank is available at this station right now",
    "eject_failed": "the station could not release a power bank; nothing was charged",
    "station_offline": "the station is offline",
    "card_hold_not_authorised": "your card did not authorise this package's price",
}

RENTAL_STARTS = Counter(
    "powerbank_http_rental_starts_total", "Rental start requests by outcome", ["outcome"]
)
RENTAL_START_SECONDS = Histogram(
    "powerbank_http_rental_start_seconds",
    "Time from a start request to its answer",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
)


async def start_rental_via_actor(runtime, **kwargs: Any) -> dict[str, Any]:
    """The lead's Rental actor entry point, imported on first use so the HTTP layer loads
    without it (and tests can inject their own starter)."""
    from powerbank.actors.rental import start_rental

    return await start_rental(runtime, **kwargs)


# --- pure decisions ---------------------------------------------------------------------------


def rental_id_for(user_id: uuid.UUID, idempotency_key: str | None) -> uuid.UUID:
    if idempotency_key is None:
        return uuid.uuid4()
    return uuid.uuid5(RENTAL_NAMESPACE, f"{user_id}:{idempotency_key}")


def start_outcome(status: str) -> int:
    """HTTP status for the rental's state when the start request answers: 201 when the bank is
    out, 409 when refused, 202 while the station is still working on it."""
    if status in ("active", "overdue", "completed", "lost"):
        return 201
    if status == "cancelled":
        return 409
    return 202


def refusal_body(reason: str | None, rental: RentalView | None) -> dict[str, Any]:
    code = reason or "rental_cancelled"
    return {
        "error": code,
        "detail": REFUSAL_TEXT.get(code, f"the rental was cancelled: {code}"),
        "rental": rental,
    }


# --- storage ----------------------------------------------------------------------------------

StartStation = aliased(Station, name="start_station")
ReturnStation = aliased(Station, name="return_station")


def rental_rows():
    return (
        select(Rental, StartStation.serial, ReturnStation.serial, PowerBank.serial, RentalPackage.code)
        .join(StartStation, StartStation.id == Rental.station_id)
        .outerjoin(ReturnStation, ReturnStation.id == Rental.return_station_id)
        .outerjoin(PowerBank, PowerBank.id == Rental.power_bank_id)
        .outerjoin(RentalPackage, RentalPackage.id == Rental.package_id)
    )


def rental_view(rental: Rental, station_sn: str | None, return_sn: str | None, bank_sn: str | None, package_code: str | None) -> RentalView:
    return RentalView(
        id=rental.id,
        status=rental.status,
        station_id=rental.station_id,
        station_sn=station_sn,
        package_id=rental.package_id,
        package_code=package_code,
        power_bank_serial=bank_sn,
        slot_number=rental.slot_number,
        return_station_sn=return_sn,
        currency=rental.currency,
        hold_minor=rental.hold_minor,
        fee_minor=rental.fee_minor,
        charged_minor=rental.charged_minor,
        due_minor=rental.due_minor,
        quick_return=rental.quick_return,
        cancel_reason=rental.cancel_reason,
        started_at=rental.started_at,
        due_at=rental.due_at,
        returned_at=rental.returned_at,
        created_at=rental.created_at,
    )


async def load_rental(session: AsyncSession, rental_id: uuid.UUID, user_id: uuid.UUID) -> RentalView | None:
    row = (
        await session.execute(rental_rows().where(Rental.id == rental_id, Rental.user_id == user_id))
    ).one_or_none()
    return None if row is None else rental_view(*row)


async def validate_start(session: AsyncSession, data: StartRentalRequest) -> tuple[Station, RentalPackage]:
    station = (await session.execute(select(Station).where(Station.serial == data.station_sn))).scalar_one_or_none()
    if station is None:
        raise ApiError(404, "station_not_found", f"no station with serial {data.station_sn!r}")
    if station.status != "online":
        raise ApiError(409, "station_offline", f"station {data.station_sn} is {station.status}")
    package = await session.get(RentalPackage, data.package_id)
    if package is None:
        raise ApiError(404, "package_not_found", f"no package {data.package_id}")
    if not package.is_active:
        raise ApiError(422, "package_inactive", f"package {package.code} is not offered any more")
    return station, package


async def validate_reservation(session: AsyncSession, reservation_id: uuid.UUID, user_id: uuid.UUID, station: Station) -> None:
    """A reservation a start may use: this person's, at this station, still holding its bank."""
    reservation = await session.get(Reservation, reservation_id)
    if reservation is None or reservation.user_id != user_id:
        raise ApiError(404, "reservation_not_found", f"no reservation {reservation_id}")
    if reservation.station_id != station.id:
        raise ApiError(409, "reservation_elsewhere", "the reservation holds a bank at another station")
    if reservation.status != "confirmed":
        raise ApiError(409, "reservation_not_held", f"the reservation is {reservation.status}")


# --- routes -----------------------------------------------------------------------------------


class RentalController(Controller):
    path = "/api/rentals"
    tags = ["rentals"]
    security = BEARER_SECURITY
    dependencies = {"paging": Provide(provide_paging)}

    @post(
        "/start",
        status_code=201,
        responses={
            **error_responses(400, 401, 402, 404, 422, 502, 503),
            202: ResponseSpec(RentalView, description="Still ejecting at the deadline: follow it on the websocket"),
            409: ResponseSpec(
                RentalRefused,
                description="Refused: `error` is station_offline, insufficient_funds, too_many_active_rentals,"
                " unpaid_dues, no_bank_available, eject_failed, no_saved_card (payment_mode card) or"
                " card_hold_not_authorised",
                generate_examples=False,
            ),
        },
    )
    async def start(self, state: State, request: Request, data: JSONBody[StartRentalRequest]) -> Response[RentalView]:
        """Rent a bank at a station. Funds are held, the best-charged bank is ejected, and the
        answer comes when the station confirms (201) or refuses (409), or at the deadline (202)."""
        services = services_of(state)
        user_id: uuid.UUID = request.user.id
        async with services.readonly() as session:
            station, package = await validate_start(session, data)
            if data.reservation_id is not None:
                await validate_reservation(session, data.reservation_id, user_id, station)
        rental_id = rental_id_for(user_id, data.idempotency_key)
        started = time.perf_counter()
        payment = await self._authorise_card(state, data, user_id, rental_id, package)
        if data.reservation_id is not None:
            payment["reservation_id"] = data.reservation_id
        view = await self._run_starter(state, rental_id, user_id, station.id, package.id, payment)
        RENTAL_START_SECONDS.observe(time.perf_counter() - started)
        async with services.readonly() as session:
            rental = await load_rental(session, rental_id, user_id)
        status = rental.status if rental is not None else str((view or {}).get("status", "pending"))
        code = start_outcome(status)
        RENTAL_STARTS.labels(outcome=status).inc()
        if code == 409:
            reason = rental.cancel_reason if rental is not None else (view or {}).get("cancel_reason")
            return Response(refusal_body(reason, rental), status_code=409)
        if rental is None:
            # Accepted, but not even the pending row is visible yet: the app follows the id.
            return Response({"id": str(rental_id), "status": status}, status_code=202)
        return Response(rental, status_code=code)

    @staticmethod
    async def _authorise_card(
        state: State, data: StartRentalRequest, user_id: uuid.UUID, rental_id: uuid.UUID, package: RentalPackage
    ) -> dict[str, Any]:
        """For a card rental, the hold on the saved card comes first, outside any actor (the
        provider is called here, never inside a transaction); the starter's extra arguments."""
        if data.payment_mode == "wallet":
            return {}
        from powerbank import payment_flows
        from powerbank.actors.rental import hold_amount_minor
        from powerbank.http.routes_payment import as_api_errors, gateway_of

        with as_api_errors():
            intent_id = await payment_flows.authorise_rental_card(
                services_of(state), gateway_of(state), user_id, rental_id, hold_amount_minor(package))
        return {"payment_mode": "card", "card_intent_id": intent_id}

    @staticmethod
    async def _run_starter(
        state: State, rental_id: uuid.UUID, user_id: uuid.UUID, station_id: uuid.UUID, package_id: uuid.UUID,
        payment: dict[str, Any],
    ) -> dict[str, Any] | None:
        services = services_of(state)
        try:
            return await state.start_rental(
                services.runtime,
                rental_id=rental_id,
                user_id=user_id,
                station_id=station_id,
                package_id=package_id,
                timeout_s=services.settings.rental_start_timeout_ms / 1000,
                **payment,
            )
        except (TimeoutError, asyncio.TimeoutError):
            return None

    @get("/active", responses=error_responses(401))
    async def active(self, state: State, request: Request) -> list[RentalView]:
        """The caller's open rentals (pending, ejecting, active, overdue), newest first."""
        async with services_of(state).readonly() as session:
            rows = await session.execute(
                rental_rows()
                .where(Rental.user_id == request.user.id, Rental.status.in_(OPEN_STATUSES))
                .order_by(Rental.created_at.desc())
            )
            return [rental_view(*row) for row in rows]

    @get("/history", responses=error_responses(400, 401))
    async def history(
        self,
        state: State,
        request: Request,
        paging: NamedDependency[Paging],
        status: Annotated[
            str | None,
            QueryParameter(
                description="only rentals in this status",
                pattern="^(pending|ejecting|active|overdue|completed|cancelled|lost)$",
            ),
        ] = None,
    ) -> RentalPage:
        """All the caller's rentals, newest first."""
        where = [Rental.user_id == request.user.id]
        if status is not None:
            where.append(Rental.status == status)
        async with services_of(state).readonly() as session:
            total = await session.scalar(select(func.count()).select_from(Rental).where(*where))
            rows = await session.execute(
                rental_rows()
                .where(*where)
                .order_by(Rental.created_at.desc(), Rental.id)
                .offset(paging.offset)
                .limit(paging.page_size)
            )
            items = [rental_view(*row) for row in rows]
        return RentalPage(items=items, page=paging.page, page_size=paging.page_size, total=total or 0)

    @get("/{rental_id:uuid}", responses=error_responses(400, 401, 404))
    async def one(self, state: State, request: Request, rental_id: FromPath[uuid.UUID]) -> RentalView:
        """One of the caller's rentals (404 `rental_not_found` for anyone else's)."""
        async with services_of(state).readonly() as session:
            rental = await load_rental(session, rental_id, request.user.id)
        if rental is None:
            raise ApiError(404, "rental_not_found", f"no rental {rental_id}")
        return rental



# --- cancel, extend, location, report issue ---------------------------------------------------
#
# Cancel and extend change the rental, so they are commands to its Rental actor (the decisions are
# `cancel_refusal` and `extension_refusal` in actors/rental.py); a location fix or an issue report
# only adds a row about the rental and is written here. Every route first finds the rental among
# the caller's own: anyone else's is a 404 like a missing one.

ACTION_TIMEOUT_S = 10.0
LOCATION_STATUSES = ("active", "overdue")
EXTENSION_NAMESPACE = uuid.UUID("0f3c9a52-7d0e-4f61-9b3a-5f6e2d8c1a47")

ACTION_REFUSAL_TEXT = {
    "eject_in_progress": "the station is releasing your power bank; it can no longer be cancelled",
    "bank_taken": "the power bank is out: return it at any station to end the rental",
    "rental_closed": "the rental has already ended",
    "rental_not_active": "only a rental with the power bank out can be extended",
    "beyond_maximum_duration": "that would go past the package's maximum rental time",
    "insufficient_funds": "not enough money in your wallet for the extension",
}


def action_refused(result: dict[str, Any]) -> ApiError:
    reason = str(result.get("reason") or "refused")
    return ApiError(409, reason, ACTION_REFUSAL_TEXT.get(reason, f"refused: {reason}"))


def extension_id_for(rental_id: uuid.UUID, user_id: uuid.UUID, idempotency_key: str | None) -> uuid.UUID:
    if idempotency_key is None:
        return uuid.uuid4()
    return uuid.uuid5(EXTENSION_NAMESPACE, f"{rental_id}:{user_id}:{idempotency_key}")


async def own_rental(session: AsyncSession, rental_id: uuid.UUID, user_id: uuid.UUID) -> Rental:
    rental = (await session.execute(select(Rental).where(Rental.id == rental_id, Rental.user_id == user_id))).scalar_one_or_none()
    if rental is None:
        raise ApiError(404, "rental_not_found", f"no rental {rental_id}")
    return rental


async def call_actor(services, kind: str, entity_id: str, name: str, payload: dict[str, Any], command_id: str) -> dict[str, Any]:
    try:
        return await services.runtime.call(kind, entity_id, name, payload, command_id=command_id, timeout_s=ACTION_TIMEOUT_S)
    except (TimeoutError, asyncio.TimeoutError) as exc:
        raise ApiError(503, "actor_timeout", "accepted but not applied in time; read the rental again shortly") from exc


class RentalActionController(Controller):
    path = "/api/rentals"
    tags = ["rentals"]
    security = BEARER_SECURITY

    @post("/{rental_id:uuid}/cancel", status_code=200, responses=error_responses(400, 401, 404, 409, 503))
    async def cancel(self, state: State, request: Request, rental_id: FromPath[uuid.UUID]) -> RentalView:
        """Cancel a rental before any power bank is on its way (status pending); the held money is
        released. 409 `eject_in_progress`, `bank_taken` (return it instead) or `rental_closed`."""
        services = services_of(state)
        user_id = request.user.id
        async with services.readonly() as session:
            await own_rental(session, rental_id, user_id)
        result = await call_actor(
            services, "rental", str(rental_id), "CancelRental", {"user_id": str(user_id)}, f"cancel:{uuid.uuid4()}"
        )
        async with services.readonly() as session:
            view = await load_rental(session, rental_id, user_id)
        already_cancelled = view is not None and view.cancel_reason == "cancelled_by_user"
        if not result.get("ok") and not already_cancelled:
            raise action_refused(result)
        return view

    @post("/{rental_id:uuid}/extend", status_code=201, responses=error_responses(400, 401, 404, 409, 503))
    async def extend(
        self, state: State, request: Request, rental_id: FromPath[uuid.UUID], data: JSONBody[ExtendRentalRequest]
    ) -> RentalExtensionView:
        """Buy more time: `periods` times the package's duration at its price, paid now from the
        wallet; the due time moves and no late fee runs for the extended time. Up to the package's
        maximum. 409 `rental_not_active`, `beyond_maximum_duration`, `insufficient_funds`."""
        from powerbank.actors.rental import extension_refusal

        services = services_of(state)
        user_id = request.user.id
        async with services.readonly() as session:
            rental = await own_rental(session, rental_id, user_id)
            package = await session.get(RentalPackage, rental.package_id)
        minutes, price_minor = package.duration_minutes * data.periods, package.price_minor * data.periods
        # Checked here too so a plain refusal never moves money; the actor decides again.
        reason = extension_refusal(rental.status, rental.started_at, rental.due_at, package.max_duration_minutes, minutes)
        if reason is not None:
            raise action_refused({"reason": reason})
        extension_id = extension_id_for(rental_id, user_id, data.idempotency_key)
        transfer_id = uuid.uuid5(extension_id, "payment") if price_minor else None
        if transfer_id is not None:
            paid = await call_actor(
                services, "wallet", str(user_id), "SpendWallet",
                {"transfer_id": str(transfer_id), "amount_minor": price_minor, "currency": rental.currency,
                 "reason": f"extension of rental {rental_id}"},
                f"extend-pay:{extension_id}",
            )
            if not paid.get("ok"):
                raise action_refused(paid)
        result = await call_actor(
            services, "rental", str(rental_id), "ExtendRental",
            {"extension_id": str(extension_id), "minutes": minutes, "price_minor": price_minor,
             "transfer_id": str(transfer_id) if transfer_id else None},
            f"extend:{extension_id}",
        )
        if not result.get("ok"):
            raise action_refused(result)
        return msgspec.convert(result["extension"], RentalExtensionView)

    @post("/{rental_id:uuid}/location", status_code=201, responses=error_responses(400, 401, 404, 409))
    async def location(
        self, state: State, request: Request, rental_id: FromPath[uuid.UUID], data: JSONBody[LocationRequest]
    ) -> LocationRecorded:
        """Record where the phone (and so the power bank) is, while the bank is out."""
        now = utcnow()
        recorded_at = min(data.recorded_at or now, now)  # a phone clock ahead is not the future
        async with services_of(state).sessions.begin() as session:
            rental = await own_rental(session, rental_id, request.user.id)
            if rental.status not in LOCATION_STATUSES:
                raise ApiError(409, "rental_not_active", "locations are recorded only while the power bank is out")
            session.add(
                RentalLocation(
                    rental_id=rental.id, latitude=data.latitude, longitude=data.longitude, accuracy_m=data.accuracy_m,
                    recorded_at=recorded_at, received_at=now,
                )
            )
        return LocationRecorded(rental_id=rental_id, recorded_at=recorded_at)

    @post("/{rental_id:uuid}/report-issue", status_code=201, responses=error_responses(400, 401, 404))
    async def report_issue(
        self, state: State, request: Request, rental_id: FromPath[uuid.UUID], data: JSONBody[RentalIssueRequest]
    ) -> RentalIssueView:
        """Report a problem with a rental (faulty bank, wrong charge, ...), optionally with a photo
        (an upload with purpose `rental_issue`)."""
        async with services_of(state).sessions.begin() as session:
            rental = await own_rental(session, rental_id, request.user.id)
            await own_media(session, request.user.id, data.media_id, "rental_issue")
            issue = RentalIssue(
                rental_id=rental.id, kind=data.kind, description=data.description, media_id=data.media_id,
                status="open", created_at=utcnow(),
            )
            session.add(issue)
            await session.flush()
            return RentalIssueView(
                id=issue.id, rental_id=rental.id, kind=issue.kind, description=issue.description,
                status=issue.status, created_at=issue.created_at,
            )

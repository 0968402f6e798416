"""Admin endpoints (role admin or superadmin). Money changes go through the Wallet actor like
every other wallet mutation; this layer only authorizes, validates and waits for the result."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime

from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.http.auth import BEARER_SECURITY, AuthUser, require_admin
from powerbank.http.deps import Paging, provide_paging, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.routes_wallet import read_wallet
from powerbank.broker.embedded import HASH_CACHE_TTL_S, provision_station_password
from powerbank.broker.protocol import Topics
from powerbank.http.schemas import (
    CreditRequest,
    CreditResult,
    StationCredentials,
    StationStatusHistory,
    StatusChangeView,
)
from powerbank.storage.models import Station, StationStatusChange, User
from powerbank.storage.types import utcnow

log = logging.getLogger(__name__)

# Fixed namespace: the same idempotency key for the same user always names the same transfer.
CREDIT_NAMESPACE = uuid.UUID("3f0d7c52-2a8e-4d0f-9a51-6b1f0c8e9d21")
CREDIT_WAIT_S = 10.0
NOT_FOUND_REASONS = frozenset({"wallet_not_found", "no_wallet", "wallet_not_open"})


def credit_transfer_id(user_id: uuid.UUID, idempotency_key: str | None) -> uuid.UUID:
    if idempotency_key is None:
        return uuid.uuid4()
    return uuid.uuid5(CREDIT_NAMESPACE, f"{user_id}:{idempotency_key}")


def refusal_error(result: dict) -> ApiError:
    reason = str(result.get("reason") or "credit_refused")
    status = 404 if reason in NOT_FOUND_REASONS else 409
    details = {k: v for k, v in result.items() if k not in ("ok", "reason") and _json_scalar(v)}
    return ApiError(status, reason, f"the wallet refused the credit: {reason}", **details)


def _json_scalar(value) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def change_views(changes: list[StationStatusChange], ended_at: datetime) -> list[StatusChangeView]:
    """Newest-first changes, each with how long its status lasted: until the change after it
    (the one before it in the list), the newest until `ended_at`."""
    views = []
    for change in changes:
        views.append(
            StatusChangeView(
                from_status=change.from_status, to_status=change.to_status, reason=change.reason,
                changed_at=change.changed_at,
                lasted_s=round(max(0.0, (ended_at - change.changed_at).total_seconds()), 3),
            )
        )
        ended_at = change.changed_at
    return views


async def status_history(session: AsyncSession, station: Station, paging: Paging) -> StationStatusHistory:
    by_station = select(StationStatusChange).where(StationStatusChange.station_id == station.id)
    total = await session.scalar(select(func.count()).select_from(by_station.subquery()))
    newest_first = by_station.order_by(StationStatusChange.changed_at.desc(), StationStatusChange.id.desc())
    # One row more than the page: the change just after the page's first one ends its period.
    start = max(paging.offset - 1, 0)
    rows = list((await session.execute(newest_first.offset(start).limit(paging.page_size + 1))).scalars())
    ended_at = utcnow()
    if paging.offset > 0 and rows:
        ended_at, rows = rows[0].changed_at, rows[1:]
    items = change_views(rows[: paging.page_size], ended_at)
    return StationStatusHistory(
        station_id=station.id, serial=station.serial, status=station.status, items=items,
        page=paging.page, page_size=paging.page_size, total=total or 0,
    )


class AdminController(Controller):
    path = "/api/admin"
    tags = ["admin"]
    security = BEARER_SECURITY
    guards = [require_admin]
    dependencies = {"paging": Provide(provide_paging)}

    @post(
        "/wallets/{user_id:uuid}/credit",
        status_code=200,
        responses=error_responses(400, 401, 403, 404, 409, 503),
    )
    async def credit_wallet(self, state: State, request: Request, user_id: FromPath[uuid.UUID], data: JSONBody[CreditRequest]) -> CreditResult:
        """Credit a user's wallet (goodwill, corrections, demo top-ups). With `idempotency_key`
        a retried request credits once and returns the same result."""
        services = services_of(state)
        admin: AuthUser = request.user
        async with services.readonly() as session:
            if await session.get(User, user_id) is None:
                raise ApiError(404, "user_not_found", f"no user {user_id}")
        transfer_id = credit_transfer_id(user_id, data.idempotency_key)
        payload = {
            "amount_minor": data.amount_minor,
            "currency": data.currency,
            "transfer_id": str(transfer_id),
            "reason": data.reason,
        }
        try:
            result = await services.runtime.call(
                "wallet", str(user_id), "CreditWallet", payload,
                command_id=f"credit:{transfer_id}", timeout_s=CREDIT_WAIT_S,
            )
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise ApiError(
                503, "wallet_timeout",
                "the credit is accepted but not applied yet; repeat with the same idempotency_key to see it",
                transfer_id=str(transfer_id),
            ) from exc
        except ValueError as exc:  # the runtime saw this command id used for another entity
            raise ApiError(409, "idempotency_key_reused", str(exc)) from exc
        log.info(
            "admin %s credited %s %s to %s (%s): %s",
            admin.id, data.amount_minor, data.currency, user_id, data.reason, result,
        )
        if not result.get("ok", False):
            raise refusal_error(result)
        async with services.readonly() as session:
            wallet = await read_wallet(session, user_id, services.settings.currency)
        return CreditResult(
            user_id=user_id,
            transfer_id=transfer_id,
            amount_minor=int(result.get("amount_minor", data.amount_minor)),
            currency=data.currency,
            wallet=wallet,
        )

    @post(
        "/stations/{station_id:uuid}/mqtt-credentials",
        status_code=200,
        responses=error_responses(400, 401, 403, 404),
    )
    async def issue_station_credentials(self, state: State, request: Request, station_id: FromPath[uuid.UUID]) -> StationCredentials:
        """Issue a station a new MQTT password (provisioning a kiosk, or replacing a leaked or
        lost password). The answer is the only place the password ever appears; the database
        keeps a salted hash. Not a Station-actor command: credentials are an operator's
        business, not the station's state."""
        services = services_of(state)
        admin: AuthUser = request.user
        async with services.sessions.begin() as session:
            station = await session.get(Station, station_id)
            if station is None:
                raise ApiError(404, "station_not_found", f"no station {station_id}")
            password = await provision_station_password(session, station_id)
            serial = station.serial
        log.info("admin %s issued MQTT credentials to station %s", admin.id, serial)
        return StationCredentials(
            station_id=station_id, serial=serial, username=serial, password=password,
            topic_prefix=f"{Topics.from_env().base}/{serial}/", previous_valid_up_to_s=int(HASH_CACHE_TTL_S),
        )

    @get("/stations/{station_id:uuid}/status-history", responses=error_responses(400, 401, 403, 404))
    async def station_status_history(
        self, state: State, station_id: FromPath[uuid.UUID], paging: NamedDependency[Paging]
    ) -> StationStatusHistory:
        """When and why a station went offline and came back, newest first, with how long each
        status lasted: the Station actor writes a row in the same transaction as every change."""
        async with services_of(state).readonly() as session:
            station = await session.get(Station, station_id)
            if station is None:
                raise ApiError(404, "station_not_found", f"no station {station_id}")
            return await status_history(session, station, paging)

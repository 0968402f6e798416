"""Admin endpoints (role admin or superadmin): tenants, who works for whom, which operator owns
which station, and money corrections. Money changes go through the Wallet actor like every other
wallet mutation; this layer only authorizes, validates, waits for the result and logs the action
(AdminActionLog, http/admin_log.py). Station management open to operators is in routes_staff.py.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Annotated

from litestar import Controller, Request, get, post, put
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.http.access import role_change_refusal, status_change_refusal
from powerbank.http.admin_log import admin_action, record_admin_action
from powerbank.http.auth import BEARER_SECURITY, AuthUser, require_admin
from powerbank.http.deps import Paging, provide_paging, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.routes_staff import staff_station_view
from powerbank.http.routes_wallet import read_wallet
from powerbank.http.schemas import CreditRequest, CreditResult
from powerbank.http.schemas_staff import (
    AdminUserDetail,
    AdminUserPage,
    AdminUserView,
    RoleChange,
    StatusChange,
    StaffStationView,
    StationTenantChange,
    TenantCreate,
    TenantPage,
    TenantView,
    UserRoleView,
)
from powerbank.storage.models import RENTAL_FINAL_STATUSES, Rental, Station, Tenant, User, UserProfile

log = logging.getLogger(__name__)

# Fixed namespace: the same idempotency key for the same user always names the same transfer.
CREDIT_NAMESPACE = uuid.UUID("3f0d7c52-2a8e-4d0f-9a51-6b1f0c8e9d21")
CREDIT_WAIT_S = 10.0
NOT_FOUND_REASONS = frozenset({"wallet_not_found", "no_wallet", "wallet_not_open"})
PhonePrefix = Annotated[str | None, QueryParameter(pattern=r"^\+[0-9]{1,15}$", description="phone numbers starting with this")]
RoleFilter = Annotated[str | None, QueryParameter(pattern="^(user|operator|admin|superadmin)$")]
UserStatusFilter = Annotated[str | None, QueryParameter(pattern="^(active|blocked|deleted)$")]


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
        details = {"amount_minor": data.amount_minor, "currency": data.currency, "reason": data.reason, "transfer_id": str(transfer_id)}
        await record_admin_action(services.sessions, admin_action(request, "wallet_credited", "user", user_id, details=details))
        async with services.readonly() as session:
            wallet = await read_wallet(session, user_id, services.settings.currency)
        return CreditResult(
            user_id=user_id,
            transfer_id=transfer_id,
            amount_minor=int(result.get("amount_minor", data.amount_minor)),
            currency=data.currency,
            wallet=wallet,
        )

    # --- people ------------------------------------------------------------------------------

    @get("/users", responses=error_responses(400, 401, 403))
    async def users(
        self, state: State, paging: NamedDependency[Paging],
        phone: PhonePrefix = None, role: RoleFilter = None, status: UserStatusFilter = None,
    ) -> AdminUserPage:
        """People, newest first; `phone` matches from the start (`+97798` finds that range)."""
        query = select(User, UserProfile.full_name).outerjoin(UserProfile, UserProfile.user_id == User.id)
        if phone is not None:
            query = query.where(User.phone.startswith(phone, autoescape=True))
        if role is not None:
            query = query.where(User.role == role)
        if status is not None:
            query = query.where(User.status == status)
        async with services_of(state).readonly() as session:
            total = int(await session.scalar(select(func.count()).select_from(query.subquery())) or 0)
            rows = (await session.execute(query.order_by(User.created_at.desc(), User.id).offset(paging.offset).limit(paging.page_size))).all()
        return AdminUserPage(items=[admin_user_view(u, name) for u, name in rows], page=paging.page, page_size=paging.page_size, total=total)

    @get("/users/{user_id:uuid}", responses=error_responses(400, 401, 403, 404))
    async def user(self, state: State, user_id: FromPath[uuid.UUID]) -> AdminUserDetail:
        """One person with their wallet and rentals at a glance, for support."""
        services = services_of(state)
        async with services.readonly() as session:
            user = await session.get(User, user_id)
            if user is None:
                raise ApiError(404, "user_not_found", f"no user {user_id}")
            profile = await session.get(UserProfile, user_id)
            wallet = await read_wallet(session, user_id, services.settings.currency)
            total, still_open, due = (await session.execute(
                select(
                    func.count(),
                    func.count().filter(Rental.status.not_in(RENTAL_FINAL_STATUSES)),
                    func.coalesce(func.sum(Rental.due_minor), 0),
                ).where(Rental.user_id == user_id)
            )).one()
        return AdminUserDetail(
            user=admin_user_view(user, profile.full_name if profile else None), wallet=wallet,
            rentals_total=int(total), rentals_open=int(still_open), due_minor=int(due),
        )

    @put("/users/{user_id:uuid}/status", responses=error_responses(400, 401, 403, 404, 409))
    async def change_status(self, state: State, request: Request, user_id: FromPath[uuid.UUID], data: JSONBody[StatusChange]) -> AdminUserView:
        """Block someone (every token of theirs stops working at once: each request reads the
        status) or unblock them. Open rentals are not touched: the bank still has to come back
        and be paid for."""
        actor: AuthUser = request.user
        async with services_of(state).sessions.begin() as session:
            user = await session.get(User, user_id, with_for_update=True)
            if user is None or user.status == "deleted":
                raise ApiError(404, "user_not_found", f"no user {user_id}")
            refusal = status_change_refusal(actor.role, actor.id, user.id, user.role)
            if refusal is not None:
                raise ApiError(409 if refusal != "role_not_grantable" else 403, refusal, f"cannot change this user's status: {refusal}")
            if user.status != data.status:
                details = {"old_status": user.status, "new_status": data.status, "reason": data.reason}
                user.status = data.status
                session.add(admin_action(request, "user_blocked" if data.status == "blocked" else "user_unblocked", "user", user.id, details=details))
            profile = await session.get(UserProfile, user_id)
            return admin_user_view(user, profile.full_name if profile else None)

    # --- tenants and who works for them ---------------------------------------------------

    @post("/tenants", status_code=201, responses=error_responses(400, 401, 403, 409))
    async def create_tenant(self, state: State, request: Request, data: JSONBody[TenantCreate]) -> TenantView:
        """Register an operator company; its name and slug are unique (409 `tenant_exists`)."""
        tenant = Tenant(name=data.name, slug=data.slug, email=data.email, url=data.url, description=data.description, is_active=True)
        try:
            async with services_of(state).sessions.begin() as session:
                session.add(tenant)
                await session.flush()
                session.add(admin_action(request, "tenant_created", "tenant", tenant.id, tenant_id=tenant.id, details={"slug": data.slug}))
        except IntegrityError as exc:
            raise ApiError(409, "tenant_exists", f"a tenant named {data.name!r} or with slug {data.slug!r} exists") from exc
        return tenant_view(tenant, stations=0, staff=0)

    @get("/tenants", responses=error_responses(400, 401, 403))
    async def tenants(self, state: State, paging: NamedDependency[Paging]) -> TenantPage:
        """Every tenant by name, with how many stations and staff it has."""
        async with services_of(state).readonly() as session:
            total = int(await session.scalar(select(func.count()).select_from(Tenant)) or 0)
            tenants = list((await session.execute(
                select(Tenant).order_by(Tenant.name).offset(paging.offset).limit(paging.page_size)
            )).scalars())
            stations = await counts_by_tenant(session, Station.tenant_id, [t.id for t in tenants])
            staff = await counts_by_tenant(session, User.tenant_id, [t.id for t in tenants])
        items = [tenant_view(t, stations.get(t.id, 0), staff.get(t.id, 0)) for t in tenants]
        return TenantPage(items=items, page=paging.page, page_size=paging.page_size, total=total)

    @put("/users/{user_id:uuid}/role", responses=error_responses(400, 401, 403, 404, 409))
    async def change_role(self, state: State, request: Request, user_id: FromPath[uuid.UUID], data: JSONBody[RoleChange]) -> UserRoleView:
        """Make someone a rider, an operator of one tenant, an admin or a superadmin. Admins
        manage riders and operators; only a superadmin manages admins. The change applies to
        their next request; a token claims the old role until they sign in again, and a token
        claiming more than the table says is refused."""
        actor: AuthUser = request.user
        async with services_of(state).sessions.begin() as session:
            user = await session.get(User, user_id, with_for_update=True)
            if user is None or user.status == "deleted":
                raise ApiError(404, "user_not_found", f"no user {user_id}")
            refusal = role_change_refusal(actor.role, actor.id, user.id, user.role, data.role, data.tenant_id)
            if refusal is not None:
                raise ApiError(409 if refusal != "role_not_grantable" else 403, refusal, f"cannot make this user {data.role}: {refusal}")
            if data.tenant_id is not None and await session.get(Tenant, data.tenant_id) is None:
                raise ApiError(404, "tenant_not_found", f"no tenant {data.tenant_id}")
            details = {"old_role": user.role, "new_role": data.role, "old_tenant_id": str(user.tenant_id) if user.tenant_id else None}
            user.role, user.tenant_id = data.role, data.tenant_id
            session.add(admin_action(request, "role_changed", "user", user.id, tenant_id=data.tenant_id, details=details))
        return UserRoleView(user_id=user_id, role=data.role, tenant_id=data.tenant_id)

    @put("/stations/{station_id:uuid}/tenant", responses=error_responses(400, 401, 403, 404))
    async def assign_station(
        self, state: State, request: Request, station_id: FromPath[uuid.UUID], data: JSONBody[StationTenantChange]
    ) -> StaffStationView:
        """Hand a station to an operator (or back to the platform with `tenant_id: null`). Not a
        Station-actor command: ownership is not the station's state, and the actor never reads
        it."""
        async with services_of(state).sessions.begin() as session:
            station = await session.get(Station, station_id)
            if station is None:
                raise ApiError(404, "station_not_found", f"no station {station_id}")
            if data.tenant_id is not None and await session.get(Tenant, data.tenant_id) is None:
                raise ApiError(404, "tenant_not_found", f"no tenant {data.tenant_id}")
            details = {"old_tenant_id": str(station.tenant_id) if station.tenant_id else None}
            station.tenant_id = data.tenant_id
            session.add(admin_action(request, "station_assigned", "station", station.id, tenant_id=data.tenant_id, details=details))
            await session.flush()
            return staff_station_view(station)


def admin_user_view(user: User, full_name: str | None) -> AdminUserView:
    return AdminUserView(
        id=user.id, phone=user.phone, full_name=full_name, role=user.role, status=user.status,
        tenant_id=user.tenant_id, created_at=user.created_at, last_login_at=user.last_login_at,
    )


def tenant_view(tenant: Tenant, stations: int, staff: int) -> TenantView:
    return TenantView(
        id=tenant.id, name=tenant.name, slug=tenant.slug, email=tenant.email, url=tenant.url,
        description=tenant.description, is_active=tenant.is_active, stations=stations, staff=staff,
        created_at=tenant.created_at,
    )


async def counts_by_tenant(session: AsyncSession, column, tenant_ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    if not tenant_ids:
        return {}
    rows = await session.execute(select(column, func.count()).where(column.in_(tenant_ids)).group_by(column))
    return {tenant_id: count for tenant_id, count in rows.all()}
